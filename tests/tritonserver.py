"""A real ``tritonserver`` for the tests, assembled in a temporary folder.

From the ``nvidia-pytriton==0.7.0`` wheel (tritonserver 2.51.0 and its Python backend; ``scripts/install.sh``
downloads it into ``<venv>/triton/``) and ``../shared/triton`` (Triton's ONNX Runtime backend built for that
server), as ``../shared/triton/README.md`` describes. The Python models run in ``<venv>/triton/serving``:
numpy<2 and tokenizers, as a serving image would have. The server binds to 127.0.0.1 on free ports, is stopped
by its own pid (its process group, which holds the Python backend's stubs) and is told to die with the test
process, so nothing outlives the tests.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "triton"
INSTALLED = Path(sys.prefix) / "triton"  # what scripts/install.sh put beside this venv
SERVING = INSTALLED / "serving"  # the Python models' environment
WHEEL = "nvidia_pytriton-0.7.0-*.whl"
VERSION = "2.51.0"


def wheel() -> Path | None:
    return next(iter(sorted(INSTALLED.glob(WHEEL))), None)


def missing() -> str | None:
    """Why no server can be assembled here (the skip reason), or None."""
    if wheel() is None:
        return f"no {WHEEL} in {INSTALLED} (scripts/install.sh downloads it)"
    if not (SHARED / "backends" / "onnxruntime" / "libtriton_onnxruntime.so").is_file():
        return f"no Triton ONNX Runtime backend in {SHARED} (../shared/triton)"
    if not (SERVING / "bin" / "python3").exists():
        return f"no Python-model environment in {SERVING} (scripts/install.sh makes it)"
    return None


def assemble(home: Path) -> Path:
    """Unpack the server into ``home`` and complete its backends folder; returns that ``tritonserver`` folder."""
    with zipfile.ZipFile(wheel()) as archive:
        for info in archive.infolist():
            if info.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
                path = Path(archive.extract(info, home))
                path.chmod((info.external_attr >> 16) & 0o777 or 0o644)
    server = home / "pytriton" / "tritonserver"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"  # the serving venv is made by the same python3
    stub = server / "python_backend_stubs" / python / "triton_python_backend_stub"
    shutil.copy2(stub, server / "backends" / "python" / stub.name)
    ort = server / "backends" / "onnxruntime"
    ort.mkdir()
    for name in ("libtriton_onnxruntime.so",):
        (ort / name).write_bytes((SHARED / "backends" / "onnxruntime" / name).read_bytes())
    import onnxruntime  # the backend links the pip wheel's runtime, which must sit beside it

    [runtime] = Path(onnxruntime.__file__).parent.glob("capi/libonnxruntime.so.1.*")
    (ort / runtime.name).symlink_to(runtime)
    (ort / "libonnxruntime.so.1").symlink_to(runtime.name)
    [core] = (home / "nvidia_pytriton.libs").glob("libtritonserver-*.so")
    (ort / "libtritonserver.so").symlink_to(core)
    return server


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process goes, however it goes."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """One server process over ``repositories``; ``with`` starts it (waiting for ready) and stops it."""

    def __init__(self, home: Path, repositories: list[Path], *, ready_timeout: float = 240):
        self.home, self.repositories, self.ready_timeout = home, repositories, ready_timeout
        self.log = home / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> "TritonServer":
        server = assemble(self.home)
        self.http_port, self.grpc_port = free_ports(2)
        env = {**os.environ, "LD_LIBRARY_PATH": str(self.home / "nvidia_pytriton.libs"),
               "PATH": f"{SERVING / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        command = [str(server / "bin" / "tritonserver"),
                   *(f"--model-repository={repo}" for repo in self.repositories),
                   f"--backend-directory={server / 'backends'}",
                   "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                   "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                   "--allow-metrics=false", "--allow-gpu-metrics=false", "--exit-timeout-secs=10"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, cwd=self.home, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver not ready after {self.ready_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the server (it unloads its models and ends their stubs), SIGKILL after ``timeout``; then
        SIGKILL to whatever is left in its process group, while its unreaped pid keeps that group id its own."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.returncode is None:  # not reaped yet
            process.terminate()
            deadline = time.monotonic() + timeout
            while not os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                if time.monotonic() > deadline:
                    process.kill()
                time.sleep(0.1)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        for unpacked in ("pytriton", "nvidia_pytriton.libs"):  # 150 MB; the log stays
            shutil.rmtree(self.home / unpacked, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
