"""A real Triton Inference Server on this machine, from the ``nvidia-pytriton`` wheel.

The wheel (install extra ``clipmatch[server]``; it pins numpy<2) bundles the
``tritonserver`` binary and the Python backend, without its per-Python stub
in place. ``TritonServer`` prepares a backend folder with the stub for the
running interpreter (under ``~/.cache/clipmatch``), puts this environment's
``bin`` first on ``PATH`` so the stub imports numpy and onnxruntime from it,
checks the ports, starts the binary, and waits until it is ready.

    >>> with TritonServer("triton_models", http_port=8000) as server:  # doctest: +SKIP
    ...     print(server.http_url)
"""
from __future__ import annotations

import os
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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import BackendError, DependencyError

__all__ = ["TritonServer", "ServerPorts", "free_port", "tritonserver_home"]


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


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
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


class TritonServer:
    """Start, wait for, and stop one tritonserver process serving ``repository``."""

    def __init__(self, repository: str | Path, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, *, log_file: str | Path | None = None, ready_timeout: float = 120.0,
                 threads_per_model: int | None = None, extra_args: Sequence[str] = ()):
        self.repository = Path(repository).resolve()
        self.ports = ServerPorts(http_port, grpc_port, metrics_port)
        self.ready_timeout = ready_timeout
        self.threads_per_model = threads_per_model
        self.log_file = Path(log_file) if log_file else None
        self.extra_args = tuple(extra_args)  # more tritonserver flags, e.g. --grpc-use-ssl=true
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    def command(self, home: Path, backends: Path) -> list[str]:
        return [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={home / 'caches'}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--exit-on-error=true",
            "--strict-readiness=true",
            *self.extra_args,
        ]

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

    def start(self) -> "TritonServer":
        if not self.repository.is_dir():
            raise BackendError(f"model repository {self.repository} is not a folder; "
                               f"write one with `clipmatch repository EXPORT_DIR --target python`")
        for name, port in (("http", self.ports.http), ("grpc", self.ports.grpc), ("metrics", self.ports.metrics)):
            if _port_taken(port):
                raise BackendError(f"port {port} ({name}) is already in use; stop what holds it or pass "
                                   f"--{name}-port with a free port")
        home = tritonserver_home()
        backends = _backends_with_stub(home)
        if self.log_file is None:
            self._log = tempfile.NamedTemporaryFile(prefix="tritonserver-", suffix=".log", delete=False)
            self.log_file = Path(self._log.name)
        else:
            self._log = open(self.log_file, "wb")
        self.process = subprocess.Popen(self.command(home, backends), stdout=self._log, stderr=subprocess.STDOUT,
                                        env=self._environment(home), start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendError(f"tritonserver exited with code {self.process.returncode} before it was "
                                   f"ready; its log ({self.log_file}) ends with:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise BackendError(f"tritonserver was not ready within {self.ready_timeout:.0f} s; its log "
                           f"({self.log_file}) ends with:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton unloads its models and exits), then SIGKILL after ``timeout``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
