"""Where tritonserver and its Python stub come from, and the files and environment they need to run."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import site
import sys
import sysconfig
import tempfile
from pathlib import Path

from flover_backend.paths import PROJECT_ROOT, flover_home

NGC_TRITON = Path("/opt/tritonserver")
PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
STUB = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")  # where the Python backend's shared-memory regions live
# Closed to clients without the admin key: loading a model runs its Python (a `file:` override can ship
# any model.py), unloading takes the service down, and the rest reads or rewrites server-side state.
ADMIN_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_KEY_HEADER = "flover-admin-key"  # lowercase: gRPC metadata keys must be
GRPC_ADMIN_KEY_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"  # tritonserver prefixes gRPC's


def work_dir() -> Path:
    """Where the launcher keeps generated files (repositories, logs, the stub's environment)."""
    return flover_home() / "triton"


def in_ngc_container() -> bool:
    """True inside NVIDIA's tritonserver image, whose own binary and backends we then use."""
    return (NGC_TRITON / "bin" / "tritonserver").exists()


def pytriton_dist() -> Path:
    """The tritonserver distribution inside the installed nvidia-pytriton wheel, or FLOVER_TRITON_DIST's.

    FLOVER_TRITON_DIST names the `pytriton/tritonserver` folder of an unpacked copy (benchmarks/gpu_server_bundle.py
    packs one for machines without the wheel); its `nvidia_pytriton.libs` must sit two levels up, as in the wheel.
    """
    if os.environ.get("FLOVER_TRITON_DIST"):
        return Path(os.environ["FLOVER_TRITON_DIST"])
    spec = importlib.util.find_spec("pytriton")  # finds without importing pytriton's heavy __init__
    if spec is None or spec.origin is None:
        raise RuntimeError("nvidia-pytriton is not installed: pip install -e '.[serve]'")
    return Path(spec.origin).parent / "tritonserver"


def pytriton_libs() -> Path:
    """The shared libraries the wheel's tritonserver, stubs and perf_analyzer's deps are linked against."""
    return pytriton_dist().parents[1] / "nvidia_pytriton.libs"


def prepare_backend_dir(dest: Path | None = None) -> Path:
    """Copy the python backend plus the stub built for this Python into `dest` once; return `dest`."""
    if dest is None:
        if os.environ.get("FLOVER_TRITON_DIST"):  # an unpacked copy, without the wheel's metadata
            source = hashlib.sha1(str(pytriton_dist()).encode()).hexdigest()[:8]
        else:
            source = f"pytriton{importlib.metadata.version('nvidia-pytriton')}"
        dest = work_dir() / f"backends-{source}-py{PY_VERSION}"
    dest = Path(dest)
    if (dest / "python" / STUB).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Build aside and rename into place, so concurrent launchers never see (or run) a half-copied stub.
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".backends-"))
    shutil.copytree(pytriton_dist() / "backends" / "python", tmp / "python")
    shutil.copy2(pytriton_dist() / "python_backend_stubs" / PY_VERSION / STUB, tmp / "python" / STUB)
    try:
        tmp.rename(dest)
    except OSError:  # another launcher won the race; its copy is identical
        shutil.rmtree(tmp)
    return dest


def prepare_stub_python(dest: Path | None = None) -> Path:
    """Write a venv-shaped prefix for the backend stub's embedded Python; return its `bin` for PATH.

    The stub starts Python in isolated mode (PyConfig_InitIsolatedConfig: PYTHONPATH is ignored) and
    takes its prefix from the first `python3` on PATH. This prefix's pyvenv.cfg points at the running
    interpreter's base install and its .pth puts the project root and this interpreter's site-packages
    on the stub's sys.path, so model.py can `import flover_backend` and torch without being installed.
    Folders in FLOVER_STUB_PATH (os.pathsep-separated) go ahead of those site-packages, for the stub alone: the
    stub's pybind11 reads NumPy arrays through NumPy 1.x's struct layout, so where the interpreter has NumPy 2
    a NumPy 1.26 installed into such a folder is what the stub must import (README, "GPUs").
    """
    stub_path = [d for d in os.environ.get("FLOVER_STUB_PATH", "").split(os.pathsep) if d]
    if dest is None:  # one prefix per interpreter and stub path, so servers launched with others keep theirs
        key = "\n".join([sys.prefix, *stub_path]).encode()
        dest = work_dir() / f"stub-python{PY_VERSION}-{hashlib.sha1(key).hexdigest()[:8]}"
    dest = Path(dest)
    site_dir = dest / "lib" / f"python{PY_VERSION}" / "site-packages"
    site_dir.mkdir(parents=True, exist_ok=True)
    (dest / "bin").mkdir(exist_ok=True)
    python = dest / "bin" / "python3"
    if not python.is_symlink():
        python.symlink_to(sys.executable)
    _write_if_changed(dest / "pyvenv.cfg", f"home = {Path(sys.base_prefix) / 'bin'}\n"
                      "include-system-site-packages = false\n")
    # addsitedir, not a plain path line, so the real site-packages' own .pth files (editable installs) run.
    site_dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    lines = [str(PROJECT_ROOT), *stub_path] + [f"import site; site.addsitedir({d!r})" for d in site_dirs]
    _write_if_changed(site_dir / "flover.pth", "\n".join(lines) + "\n")
    return dest / "bin"


def _write_if_changed(path: Path, text: str) -> None:
    """Replace `path` atomically, and only when its text differs (a running server may be reading it)."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def server_env(stub_bin: Path | None = None) -> dict[str, str]:
    """The environment tritonserver runs in: its libraries and the Python its backend stub embeds."""
    env = dict(os.environ)
    libs = []
    # The stub links libpython3.X.so.1.0 by name; load the running interpreter's, whose stdlib the stub
    # will use, rather than a system copy of another patch release (Debian's 3.11.2 vs pyenv's 3.11.7).
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and (Path(libdir) / str(sysconfig.get_config_var("INSTSONAME"))).exists():
        libs.append(libdir)
    if not in_ngc_container():
        libs.append(str(pytriton_libs()))
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PATH"] = f"{stub_bin or prepare_stub_python()}{os.pathsep}{env.get('PATH', os.defpath)}"
    if "OMP_WAIT_POLICY" not in env:
        # torch's OpenMP threads spin ~300k rounds at each barrier by default: in a server they then steal
        # the cores the responder thread, tritonserver and the clients need. Measured through the server on the
        # 2-core AMD EPYC (builtin:small), 32 streams x 128 tokens: 318 -> 366 tok/s greedy, 276 -> 323 sampled; one stream unchanged.
        env.setdefault("GOMP_SPINCOUNT", "30000")
    return env


def server_command(model_repository: str | Path, http_port: int = 8000, grpc_port: int = 8001,
                   metrics_port: int = 8002, host: str = "127.0.0.1", backend_dir: Path | None = None,
                   extra_args: list[str] | tuple[str, ...] = (), *, admin_key: str,
                   shm_prefix: str = "") -> list[str]:
    """The tritonserver command line serving `model_repository` on `host` at the three ports.

    The admin APIs (ADMIN_APIS) answer only requests carrying `admin_key` in the ADMIN_KEY_HEADER header
    (HTTP) or the GRPC_ADMIN_KEY_HEADER metadata (gRPC); the Python backend's shared-memory regions are named `shm_prefix`*.
    """
    if not admin_key or any(c in admin_key for c in ",:= \t\n"):
        raise ValueError("the admin key must be non-empty, without spaces, ',', ':' or '='")
    restricted = f"{','.join(ADMIN_APIS)}:{ADMIN_KEY_HEADER}={admin_key}"
    backend_config = [f"--backend-config=python,shm-region-prefix-name={shm_prefix}"] if shm_prefix else []
    if in_ngc_container():
        binary, backend_dir = NGC_TRITON / "bin" / "tritonserver", backend_dir or NGC_TRITON / "backends"
    else:
        binary, backend_dir = pytriton_dist() / "bin" / "tritonserver", backend_dir or prepare_backend_dir()
    return [
        str(binary),
        f"--model-repository={Path(model_repository).resolve()}",
        f"--backend-directory={backend_dir}",
        f"--http-address={host}", f"--http-port={http_port}",
        f"--grpc-address={host}", f"--grpc-port={grpc_port}",
        f"--metrics-address={host}", f"--metrics-port={metrics_port}",
        # Explicit control, loading every model of the repository: a model whose engine died unloads itself.
        "--model-control-mode=explicit", "--load-model=*",
        f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
        *backend_config,
        *extra_args,
    ]
