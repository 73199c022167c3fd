"""The house rules the layout promises: the public API, who imports whom, module sizes, the CLI's hook."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, sdk_only_env

PACKAGES = {"clipmatch": REPO / "sdk" / "clipmatch", "clipmatch_export": REPO / "export" / "clipmatch_export"}
MAX_LINES = 450

PUBLIC_API = [
    "BackendError", "CachedExplainer", "ClipmatchError", "ConfigError", "DependencyError", "ExplainerError",
    "Explanation", "ExportError", "GalleryIndex", "ImageEncoding", "ImageError", "IncompatibleModelError",
    "IndexBusyError", "InputError", "KnowledgeBaseExplainer", "Local", "Matcher", "ModelError", "ModelNotFoundError",
    "OpenAIExplainer", "ParityError", "Remote", "RescoreResult", "RuntimeConfig", "SearchHit", "SearchResult",
    "Searcher", "ShapeError", "StorageError", "TextEncoding", "TextError", "TransformersExplainer", "TritonOptions",
    "__version__", "aio", "build_index", "connect",
]


def _modules() -> dict[str, Path]:
    """Every importable module of both packages (the Triton-side files are data, not modules)."""
    out = {}
    for top, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            if "triton_models" in rel.parts:
                continue
            parts = [top, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports anywhere in its body (lazy imports count)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_the_public_api_is_pinned():
    import clipmatch

    assert sorted(clipmatch.__all__) == sorted(PUBLIC_API)
    for name in PUBLIC_API:
        assert getattr(clipmatch, name) is not None


def test_the_sdk_never_imports_the_pytorch_side_and_nothing_imports_the_triton_model_files():
    modules = _modules()
    known = set(modules)
    for module, path in modules.items():
        text = path.read_text()
        assert "triton_models." not in text.replace("triton_models/", ""), f"{module} imports a Triton-side file"
        if module.startswith("clipmatch."):
            wrong = sorted(m for m in _imports(module, path, known) if m.startswith("clipmatch_export"))
            assert not wrong, f"{module} imports {wrong}"


def test_no_import_cycles_on_either_side():
    modules = _modules()
    known = set(modules)
    # A package imports what it re-exports; an edge from a package to its own modules is not a cycle.
    graph = {m: {d for d in _imports(m, p, known) if not d.startswith(m + ".") and not m.startswith(d + ".")}
             for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_is_over_450_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_old_fusion_weights_still_load():
    """Manifests written before the scores had one name called match_prob's weight 'itm'."""
    from clipmatch.fusion import Fusion

    old = {"plain": {"cosine": 1.0, "itm": 0.25, "dcsm": 2.0}, "explained": {"cosine": 0, "itm": 1, "dcsm": 0}}
    fusion = Fusion.from_dict(old)
    assert fusion.plain.match_prob == 0.25 and fusion.explained.match_prob == 1
    assert "itm" not in Fusion.to_dict(fusion)["plain"]


def test_version_and_the_pytorch_commands_without_pytorch():
    import clipmatch

    out = subprocess.run([sys.executable, "-m", "clipmatch.cli", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"clipmatch {clipmatch.__version__}"
    # Torch missing: the PyTorch side's command says, in one line, which extra to install.
    env = sdk_only_env(blocked="torch,transformers")
    out = subprocess.run([sys.executable, "-m", "clipmatch.cli", "export", "models/default", "/nonexistent"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'clipmatch[export,cpu]'" in lines[0] and "torch" in lines[0], lines
    # The PyTorch side absent altogether: the SDK's commands still run, and --help says what is missing.
    env = sdk_only_env()
    out = subprocess.run([sys.executable, "-m", "clipmatch.cli", "--help"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "search" in out.stdout and "clipmatch[export,cpu]" in out.stdout


@pytest.mark.parametrize("command", ["repository", "index", "search"])
def test_cli_defaults_come_from_the_config_objects(command):
    """A flag's default is the config field's default, stated once."""
    from clipmatch.cli import build_parser
    from clipmatch.retrieval.index import DEFAULT_CHUNK
    from clipmatch.serving.repository import Batching, RepositoryConfig

    sub = build_parser()._subparsers._group_actions[0].choices[command]
    defaults = {a.dest: a.default for a in sub._actions}
    if command == "repository":
        b, r = Batching(), RepositoryConfig()
        assert defaults["max_batch_size"] == b.max_batch_size and defaults["queue_delay_us"] == b.max_queue_delay_us
        assert defaults["preferred_batch_sizes"] == ",".join(map(str, b.preferred_sizes))
        assert defaults["max_queue_size"] == b.max_queue_size and defaults["instances"] == r.instances
    elif command == "index":
        assert defaults["chunk"] == DEFAULT_CHUNK
    else:
        import inspect

        from clipmatch.retrieval.search import Searcher

        params = inspect.signature(Searcher.search).parameters
        assert defaults["top_k"] == params["top_k"].default and defaults["shortlist"] == params["shortlist"].default
