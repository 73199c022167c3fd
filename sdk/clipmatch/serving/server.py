"""A real Triton Inference Server on this machine, from the ``nvidia-pytriton`` wheel.

The wheel (install extra ``clipmatch[server]``; it pins numpy<2) bundles the
``tritonserver`` binary and the Python backend, without its per-Python stub
in place. ``TritonServer`` prepares a backend folder with the stub for the
running interpreter (under ``~/.cache/clipmatch``), puts this environment's
``bin`` first on ``PATH`` so the stub imports numpy and onnxruntime from it,
checks the ports, starts the binary, and waits until it is ready.

Other backends (Triton's native ``onnxruntime`` or ``tensorrt``, as NVIDIA's
container has them in ``/opt/tritonserver/backends``) come from the folders
given as ``backend_directory`` or in ``$CLIPMATCH_TRITON_BACKENDS``: each
backend subfolder there is linked into the folder the server reads, beside
the Python backend. They must be built for this server's backend API (1.19,
Triton 2.51).

Locked down by default: every endpoint binds 127.0.0.1, and the APIs that
reach beyond inference (system shared memory, which lets a client read and
overwrite ``/dev/shm`` objects of the server's user; model loading; logging
and trace settings) answer only requests that carry a key generated at each
start and never printed (Triton's restricted-API flags).

    >>> with TritonServer("triton_models", http_port=8000) as server:  # doctest: +SKIP
    ...     print(server.http_url)
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clipmatch.errors import BackendError, DependencyError
from clipmatch.serving.repository import DEFAULT_MODEL_FILES, PLATFORM_BACKENDS

__all__ = ["TritonServer", "ServerPorts", "free_port", "tritonserver_home", "RESTRICTED_APIS", "BACKENDS_ENV",
           "needed_backends"]

BACKENDS_ENV = "CLIPMATCH_TRITON_BACKENDS"
# API groups closed unless the server is started with open_admin_api=True. Inference,
# health, metadata, model configs and statistics stay open: a client needs them.
RESTRICTED_APIS = ("shared-memory", "model-repository", "logging", "trace")
ADMIN_HEADER = "clipmatch-admin-key"


@dataclass(frozen=True)
class ServerPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and benchmarks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_taken(port: int, host: str = "0.0.0.0") -> bool:
    """Whether ``port`` cannot be bound on ``host`` (an IPv4 or IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def tritonserver_home() -> Path:
    """The tritonserver folder inside the installed nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as exc:
        raise DependencyError("the Triton server comes with nvidia-pytriton: pip install 'clipmatch[server]'") \
            from exc
    home = Path(pytriton.__file__).parent / "tritonserver"
    if not (home / "bin" / "tritonserver").is_file():
        raise DependencyError(f"nvidia-pytriton is installed but {home}/bin/tritonserver is missing")
    return home


def _backends_with_stub(home: Path) -> Path:
    """A copy of the wheel's backends folder with the stub for this Python in backends/python."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise DependencyError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipmatch"
    target = cache / f"tritonserver-backends-{version}-{int(stub.stat().st_mtime)}"
    if not (target / "python" / stub.name).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache))
        shutil.copytree(home / "backends", tmp / "backends")
        shutil.copy2(stub, tmp / "backends" / "python" / stub.name)
        try:
            (tmp / "backends").rename(target)
        except OSError:  # another process won the race; its copy is as good
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def needed_backends(repository: Path) -> dict[str, list[str]]:
    """backend name -> the repository's models that need it. Ensembles need none; a config that
    names neither (Triton then picks one by the model file) is judged by its file, and one this
    cannot judge is left to the server."""
    needs: dict[str, list[str]] = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        text = config.read_text(errors="replace")
        backend = re.search(r"""^\s*backend\s*:\s*["']([^"']+)["']""", text, re.M)
        platform = re.search(r"""^\s*platform\s*:\s*["']([^"']+)["']""", text, re.M)
        if backend:
            name = backend.group(1)
        elif platform:
            name = PLATFORM_BACKENDS.get(platform.group(1))
        else:
            files = {p.name for p in config.parent.glob("*/*")}
            name = next((b for b, f in DEFAULT_MODEL_FILES.items() if f in files), None)
        if name:
            needs.setdefault(name, []).append(config.parent.name)
    return needs


def _backend_sources(backend_directory: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """The folders holding extra backends: the argument, else $CLIPMATCH_TRITON_BACKENDS (os.pathsep-separated)."""
    if backend_directory is None:
        given = [p for p in os.environ.get(BACKENDS_ENV, "").split(os.pathsep) if p]
    elif isinstance(backend_directory, (str, Path)):
        given = [backend_directory]
    else:
        given = list(backend_directory)
    folders = [Path(p).expanduser().resolve() for p in given]
    for folder in folders:
        if not folder.is_dir():
            raise BackendError(f"backend directory {folder} is not a folder")
    return folders


def _compose_backends(python_backends: Path, sources: Sequence[Path]) -> Path:
    """A fresh folder of links: the wheel's Python backend (with its stub) and every backend of ``sources``."""
    folder = Path(tempfile.mkdtemp(prefix="clipmatch-backends-"))
    (folder / "python").symlink_to(python_backends / "python", target_is_directory=True)
    for source in sources:
        for backend in sorted(p for p in source.iterdir() if p.is_dir() and p.name != "python"):
            if not (folder / backend.name).exists():  # the first folder that has a backend wins
                (folder / backend.name).symlink_to(backend, target_is_directory=True)
    return folder


def _die_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the server outlives a killed parent
        pass


def _load_failures(log: str) -> list[str]:
    """'model: reason' for every model the server failed to load, from its log."""
    found = []
    pattern = r"(?:failed to load(?: model)?|Poll failed for model directory) '([^']+)'(?: version (\d+))?: (.*?)\"?$"
    for m in re.finditer(pattern, log, re.M):
        line = f"{m.group(1)}{f' (version {m.group(2)})' if m.group(2) else ''}: {m.group(3)}"
        if line not in found:
            found.append(line)
    return found


class TritonServer:
    """Start, wait for, and stop one tritonserver process serving ``repository``."""

    def __init__(self, repository: str | Path, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, *, host: str = "127.0.0.1",
                 backend_directory: str | Path | Sequence[str | Path] | None = None, open_admin_api: bool = False,
                 log_file: str | Path | None = None, ready_timeout: float = 120.0, exit_timeout: int = 10,
                 threads_per_model: int | None = None, onnxruntime_pool: int | None = None,
                 die_with_parent: bool = False, extra_args: Sequence[str] = ()):
        self.repository = Path(repository).resolve()
        self.ports = ServerPorts(http_port, grpc_port, metrics_port)
        self.host = host  # the address every endpoint binds; 0.0.0.0 for every interface
        self.backend_sources = _backend_sources(backend_directory)
        self.open_admin_api = open_admin_api
        # Requests to the restricted APIs must carry this header; it is never printed.
        self.admin_headers = {ADMIN_HEADER: secrets.token_hex(16)}
        self.ready_timeout = ready_timeout
        # How long a stopping server waits for in-flight requests and, after them, for
        # clients' idle keep-alive HTTP connections (Triton's default, 30 s, is mostly
        # spent waiting on the latter).
        self.exit_timeout = exit_timeout
        self.threads_per_model = threads_per_model  # python target: overrides the configs' thread count
        # Native onnxruntime backend: one thread pool of this many threads shared by every
        # model instead of a pool per session (the configs' thread counts go unused). Large
        # graphs gain from it, small ones lose to its spinning (README, "Deploying to Triton").
        self.onnxruntime_pool = onnxruntime_pool
        self.log_file = Path(log_file) if log_file else None
        # Linux: the server gets SIGTERM when the thread that started it dies, even by SIGKILL,
        # so a killed `clipmatch serve` leaves no server behind. Off by default: a server
        # started from a worker thread would die with that thread.
        self.die_with_parent = die_with_parent
        self.extra_args = tuple(extra_args)  # more tritonserver flags, e.g. --grpc-use-ssl=true
        self.process: subprocess.Popen | None = None
        self._log = None
        self._backends: Path | None = None

    @property
    def client_host(self) -> str:
        """Where a client on this machine reaches the server, as a URL writes it."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"[{host}]" if ":" in host else host

    @property
    def http_url(self) -> str:
        return f"http://{self.client_host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.client_host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host}:{self.ports.metrics}/metrics"

    def command(self, home: Path, backends: Path) -> list[str]:
        command = [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={home / 'caches'}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout}",
        ]
        if self.onnxruntime_pool:
            command += ["--backend-config=onnxruntime,enable-global-threadpool=true",
                        f"--backend-config=onnxruntime,intra_op_thread_count={self.onnxruntime_pool}"]
        if not self.open_admin_api:
            (key, value), = self.admin_headers.items()
            for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):  # 2.51's names
                command.append(f"{flag}={','.join(RESTRICTED_APIS)}:{key}={value}")
        return command + list(self.extra_args)

    def _environment(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        # The stub links libpython: this interpreter's, not the system's.
        libs = [sysconfig.get_config_var("LIBDIR") or "", str(home.parent.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")])
        # The stub's interpreter ignores PYTHONPATH; it finds packages through the first python on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if self.threads_per_model:
            env["CLIPMATCH_TRITON_THREADS"] = str(self.threads_per_model)
        return env

    def _check_repository(self) -> dict[str, list[str]]:
        if not self.repository.is_dir():
            raise BackendError(f"model repository {self.repository} is not a folder; "
                               f"write one with `clipmatch repository EXPORT_DIR --target python`")
        needs = needed_backends(self.repository)
        if not needs:
            what = ("is an export folder, not a model repository"
                    if (self.repository / "clipmatch_export.json").is_file() else "holds no model folders (config.pbtxt)")
            raise BackendError(f"{self.repository} {what}; write a repository with "
                               f"`clipmatch repository EXPORT_DIR --out DIR`")
        have = {"python"} | {p.name for src in self.backend_sources for p in src.iterdir() if p.is_dir()}
        missing = {b: models for b, models in needs.items() if b not in have}
        if missing:
            where = ", ".join(map(str, self.backend_sources)) or "no backend directory"
            lines = "; ".join(f"the {b} backend for {', '.join(models)}" for b, models in missing.items())
            raise BackendError(
                f"{self.repository} needs {lines}, which this server does not have (searched: the wheel's "
                f"python backend and {where}). Pass --backend-directory DIR (or set ${BACKENDS_ENV}) to a "
                f"folder holding {', '.join(f'{b}/libtriton_{b}.so' for b in missing)} built for Triton 2.51, such as "
                f"/opt/tritonserver/backends in NVIDIA's container, or write a repository this server can run: "
                f"`clipmatch repository EXPORT_DIR --target python`")
        return needs

    def start(self) -> TritonServer:
        self._check_repository()
        for name, port in (("http", self.ports.http), ("grpc", self.ports.grpc), ("metrics", self.ports.metrics)):
            if _port_taken(port, self.host or "0.0.0.0"):
                raise BackendError(f"port {port} ({name}) is already in use; stop what holds it or pass "
                                   f"--{name}-port with a free port")
        home = tritonserver_home()
        python_backends = _backends_with_stub(home)
        try:
            self._backends = _compose_backends(python_backends, self.backend_sources)
            if self.log_file is None:
                self._log = tempfile.NamedTemporaryFile(prefix="tritonserver-", suffix=".log", delete=False)
                self.log_file = Path(self._log.name)
            else:
                self._log = open(self.log_file, "wb")
            self.process = subprocess.Popen(self.command(home, self._backends), stdout=self._log,
                                            stderr=subprocess.STDOUT, env=self._environment(home),
                                            start_new_session=True,
                                            preexec_fn=_die_with_parent if self.die_with_parent else None)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _failure(self, what: str) -> BackendError:
        log = self.log_file.read_text(errors="replace") if self.log_file and self.log_file.exists() else ""
        failures = _load_failures(log)
        if failures:
            return BackendError(f"tritonserver {what}: models failed to load:\n  " + "\n  ".join(failures)
                                + f"\n(full log: {self.log_file})")
        return BackendError(f"tritonserver {what}; its log ({self.log_file}) ends with:\n{self.log_tail()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._failure(f"exited with code {self.process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise self._failure(f"was not ready within {self.ready_timeout:.0f} s")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton unloads its models and exits), then SIGKILL after ``timeout``
        (default: the exit timeout and 10 s more)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.exit_timeout + 10 if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._backends is not None:
            shutil.rmtree(self._backends, ignore_errors=True)  # links only
            self._backends = None
        return None if self.process is None else self.process.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
