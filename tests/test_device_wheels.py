"""benchmarks/device_wheels.py: a wheel slimmed to one native library still installs with pip, hashes and all."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.device_wheels import _digest, keep_one_library


def make_wheel(path: Path) -> None:
    files = {"pkg/__init__.py": b"X = 1\n", "pkg/libpkg_cuda130.so": b"\0" * 1000, "pkg/libpkg_cuda128.so": b"\1" * 5000,
             "pkg/libpkg_rocm64.so": b"\2" * 3000, "pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
             b"Root-Is-Purelib: false\nTag: py3-none-any\n",
             "pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n"}  # fmt: skip
    record = "".join(f"{n},{_digest(d)},{len(d)}\n" for n, d in files.items()) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("pkg-1.0.dist-info/RECORD", record)


def test_keep_one_library_and_pip_installs_it(tmp_path):
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    make_wheel(whl)
    keep_one_library(whl, "libpkg_cuda130.so")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        record = z.read("pkg-1.0.dist-info/RECORD").decode()
    assert "pkg/libpkg_cuda130.so" in names and not {"pkg/libpkg_cuda128.so", "pkg/libpkg_rocm64.so"} & names
    lib = bytes(1000)
    assert "libpkg_cuda128" not in record and f"pkg/libpkg_cuda130.so,{_digest(lib)},1000" in record
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(whl)], check=True)  # fmt: skip
    assert (site / "pkg" / "libpkg_cuda130.so").stat().st_size == 1000
    assert not (site / "pkg" / "libpkg_cuda128.so").exists()


def test_a_missing_library_is_named(tmp_path):
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    make_wheel(whl)
    with pytest.raises(SystemExit, match="no libpkg_cuda999.so.*libpkg_cuda128.so"):
        keep_one_library(whl, "libpkg_cuda999.so")
