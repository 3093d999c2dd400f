"""The tritonserver bundle for machines without pytriton: what it packs, how it unpacks, and a server run from it."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_server_check
from benchmarks.gpu_server_bundle import archive_name, build_bundle, bundle_files, unpack_bundle
from flover_backend.triton_env import PY_VERSION, prepare_stub_python, pytriton_dist


def test_bundle_holds_the_stub_and_only_the_libraries_its_binaries_load():
    members = bundle_files("3.12")
    assert "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub" in members
    assert not any("python_backend_stubs/3.11" in name for name in members)
    libs = {name.split("/", 1)[1] for name in members if name.startswith("nvidia_pytriton.libs/")}
    assert any(lib.startswith("libtritonserver-") for lib in libs)  # the binary's own
    assert any(lib.startswith("libarchive-") for lib in libs)  # the Python backend's
    assert any(lib.startswith("libicudata-") for lib in libs)  # through libxml2, two links down
    assert not any(lib.startswith("libpython3-") for lib in libs)  # the 3.13 stub's alone
    with pytest.raises(FileNotFoundError, match="no stub for Python 2.7"):
        bundle_files("2.7")


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_the_stubs_pybind11_predates_numpy_2(python):
    """Why the stub needs NumPy 1.x: pybind11 learned NumPy 2 (module numpy._core, the new descriptor layout) in
    2.12; these stubs name numpy.core alone. Under NumPy 2 (tried on this CPU with 2.2.6 through FLOVER_STUB_PATH)
    int32 outputs failed "output tensor shape does not match" and a text input killed the stub ("unpack_from
    requires a buffer of at least 252645139 bytes"); with 1.26 both answered. A pytriton whose stub names
    numpy._core fails this test: then the NumPy pin can go."""
    binary = (pytriton_dist() / "python_backend_stubs" / python / "triton_python_backend_stub").read_bytes()
    assert b"numpy.core.multiarray" in binary and b"numpy._core" not in binary


def _wheel(dest: Path, name: str) -> Path:
    """A minimal pure-Python wheel of module `name` whose `VALUE` is 42."""
    dist_info = f"{name}-1.0.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text)}" for path, text in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    path = dest / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_unpacked_wheels_go_ahead_of_site_packages_for_the_stub_alone(tmp_path, monkeypatch):
    archive = build_bundle(tmp_path / "out", PY_VERSION, [_wheel(tmp_path, "stubonly")], preset=0)
    env = unpack_bundle(archive, tmp_path / "unpacked")
    site = tmp_path / "unpacked" / "stub-site"
    assert env == {"FLOVER_TRITON_DIST": str(tmp_path / "unpacked" / "pytriton" / "tritonserver"),
                   "FLOVER_STUB_PATH": str(site)}
    assert (site / "stubonly" / "__init__.py").read_text() == "VALUE = 42\n"
    assert (Path(env["FLOVER_TRITON_DIST"]) / "bin" / "tritonserver").stat().st_mode & 0o111  # still executable
    monkeypatch.setenv("FLOVER_STUB_PATH", env["FLOVER_STUB_PATH"])
    bin_dir = prepare_stub_python(tmp_path / "prefix")
    pth = (bin_dir.parent / "lib" / f"python{PY_VERSION}" / "site-packages" / "flover.pth").read_text().splitlines()
    assert pth.index(str(site)) < min(i for i, line in enumerate(pth) if "addsitedir" in line)
    assert "stubonly" not in sys.modules  # the launcher's own interpreter never imported it
    other = "3.12" if PY_VERSION != "3.12" else "3.11"
    with pytest.raises(ValueError, match=f"holds the stub for Python {other}; this is Python {PY_VERSION}"):
        unpack_bundle(build_bundle(tmp_path / "other", other, preset=0), tmp_path / "other-unpacked")


@pytest.mark.triton
def test_server_from_the_unpacked_bundle_streams_like_in_process(tmp_path, builtin_home):
    """gpu_check's server part end to end on the CPU: pack (fast xz level), unpack, serve, stream, compare."""
    build_bundle(tmp_path / "bundle", PY_VERSION, preset=0)
    args = gpu_server_check.parse_args([
        "--bundle", str(tmp_path / "bundle" / archive_name(PY_VERSION)), "--out", str(tmp_path / "out"),
        "--model", "builtin:tiny", "--device", "cpu", "--dtype", "float32", "--streams", "1", "2",
        "--gen-len", "8", "--prompt-len", "8", "--rounds", "1", "--ready-timeout-s", "120"])
    results = gpu_server_check.run(args)
    assert "flover-gpu-server-" in results["tritonserver"]  # the unpacked copy served, not the venv's wheel
    assert not results["tritonserver"].startswith(str(pytriton_dist()))
    saved = json.loads((tmp_path / "out" / "server_gpu.json").read_text())
    assert [row["streams"] for row in saved["rows"]] == [1, 2]
    for row in saved["rows"]:
        assert row["http"]["tokens_per_s"] > 0 and row["in_process"]["tokens_per_s"] > 0
    assert "| 2 |" in (tmp_path / "out" / "server_gpu.md").read_text()
