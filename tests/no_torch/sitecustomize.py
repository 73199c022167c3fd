"""Makes torch (and transformers) unimportable in a subprocess, as on a machine without them."""
import sys


class _Block:
    BLOCKED = ("torch", "transformers", "clipmatch_export")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is blocked in this test environment")
        return None


sys.meta_path.insert(0, _Block())
