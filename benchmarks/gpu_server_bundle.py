"""Pack pytriton's tritonserver for a machine without the wheel (the lent GPU's image), and unpack it there.

The archive holds `pytriton/tritonserver` (the binary, the Python backend, the stub built for one Python) and
the part of `nvidia_pytriton.libs` those files load, in the wheel's layout so their RPATHs still resolve, plus
optionally a NumPy 1.x wheel for the stub (see triton_env.prepare_stub_python: the stub's pybind11 reads NumPy
arrays through NumPy 1.x's struct layout). Built here (the GPU machine reaches no registry), then carried there as the ignored folder .gpu_bundle:

    .venv/bin/python -m benchmarks.gpu_server_bundle --python 3.12 --download-numpy     # ~41 MiB, ~1.5 min

(`--download-numpy` fetches NUMPY_PIN's wheel for that Python from PyPI with pip; `--numpy-wheel FILE` takes one
at hand.) Only the archive lands in .gpu_bundle, so what travels stays within the device tool's 64 MiB.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from flover_backend.triton_env import PY_VERSION, STUB, pytriton_dist, pytriton_libs

NUMPY_PIN = "numpy==1.26.4"  # the last NumPy whose array struct layout the pybind11 in pytriton 0.7.0's stubs reads
ENTRY_POINTS = ("bin/tritonserver", "backends/python/libtriton_python.so", "caches/local/libtritoncache_local.so")


def archive_name(python: str) -> str:
    """The archive's file name for a stub Python version."""
    return f"tritonserver-py{python}.tar.xz"


def needed_names(path: Path) -> list[str]:
    """The DT_NEEDED entries of one ELF file."""
    # Imported here: unpacking (on the GPU machine, without pyelftools) never reads ELF files.
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    with path.open("rb") as handle:
        elf = ELFFile(handle)
        return [tag.needed for section in elf.iter_sections() if isinstance(section, DynamicSection)
                for tag in section.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]


def bundled_libraries(roots: list[Path], libs_dir: Path) -> list[Path]:
    """The libraries of `libs_dir` that `roots` load, directly or through each other; system ones stay out."""
    found: dict[str, Path] = {}
    pending = list(roots)
    while pending:
        for name in needed_names(pending.pop()):
            if name not in found and (libs_dir / name).is_file():
                found[name] = libs_dir / name
                pending.append(found[name])
    return sorted(found.values())


def bundle_files(python: str) -> dict[str, Path]:
    """Archive member name -> source file, for the stub built for `python` (e.g. "3.12")."""
    dist, libs = pytriton_dist(), pytriton_libs()
    stub = dist / "python_backend_stubs" / python / STUB
    if not stub.is_file():
        raise FileNotFoundError(f"pytriton has no stub for Python {python}: {stub}")
    members = {f"pytriton/tritonserver/{rel}": dist / rel for rel in ENTRY_POINTS}
    members[f"pytriton/tritonserver/python_backend_stubs/{python}/{STUB}"] = stub
    utils = dist / "backends" / "python" / "triton_python_backend_utils.py"
    members["pytriton/tritonserver/backends/python/triton_python_backend_utils.py"] = utils
    for lib in bundled_libraries([dist / rel for rel in ENTRY_POINTS] + [stub], libs):
        members[f"nvidia_pytriton.libs/{lib.name}"] = lib
    return members


def build_bundle(out_dir: Path, python: str, numpy_wheels: list[Path] = (), preset: int = 9) -> Path:
    """Write out_dir/tritonserver-py<python>.tar.xz (`preset`: xz level, 0 fast to 9 small); return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / archive_name(python)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    with tarfile.open(tmp, "w:xz", preset=preset) as tar:
        for name, source in sorted(bundle_files(python).items()):
            tar.add(source, arcname=name)
        for wheel in numpy_wheels:
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
        manifest = f"python {python}\n".encode()
        info = tarfile.TarInfo("MANIFEST")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    tmp.replace(target)
    return target


def unpack_bundle(archive: Path, dest: Path) -> dict[str, str]:
    """Unpack `archive` into `dest`, install its wheels into dest/stub-site; the environment that uses them.

    Set the returned variables before starting TritonServer: FLOVER_TRITON_DIST (the unpacked tritonserver)
    and, when the archive carries wheels, FLOVER_STUB_PATH (what the stub imports ahead of site-packages).
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        built_for = tar.extractfile("MANIFEST").read().decode().split()[1]
        if built_for != PY_VERSION:  # the stub links libpython of its own version and embeds this interpreter's
            raise ValueError(f"{archive} holds the stub for Python {built_for}; this is Python {PY_VERSION}")
        # The "tar" filter (3.12, backported to 3.10.12+) keeps exec bits and refuses paths leaving `dest`.
        tar.extractall(dest, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
    env = {"FLOVER_TRITON_DIST": str(dest / "pytriton" / "tritonserver")}
    wheels = sorted((dest / "wheels").glob("*.whl"))
    if wheels:
        # --no-index: the GPU machine reaches no registry; the wheels are all it needs (NumPy has no deps).
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        "--no-compile", "--target", str(dest / "stub-site"), *map(str, wheels)], check=True)
        env["FLOVER_STUB_PATH"] = str(dest / "stub-site")
    return env


def download_numpy(dest: Path, python: str) -> list[Path]:
    """Fetch NUMPY_PIN's manylinux wheel for CPython `python` into `dest` (PyPI, via pip); return it."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(dest), NUMPY_PIN], check=True)
    return sorted(dest.glob(f"numpy-*-cp{python.replace('.', '')}-*.whl"))


def main(argv: list[str] | None = None) -> int:
    """Build the archive and print its path and size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default="3.12", help="the Python version of the machine that runs it")
    parser.add_argument("--out", type=Path, default=Path(".gpu_bundle"))
    numpy = parser.add_mutually_exclusive_group()
    numpy.add_argument("--download-numpy", action="store_true", help=f"carry {NUMPY_PIN}, fetched from PyPI")
    numpy.add_argument("--numpy-wheel", type=Path, help="carry this NumPy 1.x wheel (built for --python)")
    parser.add_argument("--preset", type=int, default=9, choices=range(10), help="xz level")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flover-wheels-") as tmp:
        wheels = [args.numpy_wheel] if args.numpy_wheel else []
        if args.download_numpy:
            wheels = download_numpy(Path(tmp), args.python)
            if not wheels:
                parser.error(f"pip found no {NUMPY_PIN} wheel for CPython {args.python}")
        path = build_bundle(args.out, args.python, wheels, args.preset)
    print(f"{path} {path.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
