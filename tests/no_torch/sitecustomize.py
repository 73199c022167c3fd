"""Makes torch (and transformers) unimportable in a subprocess, as on a machine without them.

$CLIPMATCH_TEST_BLOCK names the blocked packages (comma-separated); by default the
PyTorch side as well, for a machine with the SDK alone.
"""
import os
import sys


class _Block:
    BLOCKED = tuple(os.environ.get("CLIPMATCH_TEST_BLOCK", "torch,transformers,clipmatch_export").split(","))

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is blocked in this test environment")
        return None


sys.meta_path.insert(0, _Block())
