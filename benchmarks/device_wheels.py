"""The wheels a lent GPU machine lacks for benchmarks/gpu.py, in one folder that fits the device tool's 64 MiB.

The device image (python 3.12, torch 2.11.0+cu130; /work/.library/device/KINDS.md) has no diffusers, tyro, decord,
torchdata, imageio-ffmpeg, ftfy, came-pytorch or bitsandbytes, and cannot download. This fetches py3.12 manylinux
wheels of the versions ptrain is tested with, and slims bitsandbytes (43 MB: a library per CUDA and ROCm version)
to the one library for the image's CUDA, rewriting the wheel's RECORD so that pip installs it as any other.

    python benchmarks/device_wheels.py [--dest .whl] [--cuda 130] [--no_bitsandbytes]

then, on the machine: `python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target
/tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD` (gpu.py's docstring has the whole call).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: What the device image lacks, at the versions of ptrain's tested environment (2026-11-27). imageio-ffmpeg 0.5.1:
#: 27 MB where 0.8.1 is 68 MB.
WHEELS = ["diffusers==0.42.1", "tyro==1.0.17", "decord==0.6.0", "torchdata==0.11.0", "imageio-ffmpeg==0.5.1",
          "ftfy==6.3.1", "docstring-parser==0.18.0", "typeguard==4.6.1", "wcwidth==0.9.4", "came-pytorch==0.1.3"]  # fmt: skip
BITSANDBYTES = "bitsandbytes==0.50.2"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux2010_x86_64", "manylinux1_x86_64"]  # fmt: skip
LIMIT_MIB = 60  # the device tool carries 64 MiB with the repository


def download(specs: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run([*cmd, *specs], check=True)


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def keep_one_library(wheel: Path, keep: str) -> tuple[int, int]:
    """Rewrite `wheel` without its `lib*.so` files other than the one named `keep`; RECORD lists what is left,
    with fresh hashes. Returns (bytes before, bytes after)."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        if not any(Path(n).name == keep for n in names):
            raise SystemExit(f"{wheel.name} has no {keep}: its libraries are "
                             f"{sorted(Path(n).name for n in names if n.endswith('.so'))}")  # fmt: skip
        files = {n: z.read(n) for n in names
                 if not (Path(n).name.startswith("lib") and n.endswith(".so") and Path(n).name != keep)}  # fmt: skip
    record = next(n for n in files if n.endswith(".dist-info/RECORD"))
    lines = [f"{n},{_digest(d)},{len(d)}" for n, d in files.items() if n != record] + [f"{record},,"]
    files[record] = ("\n".join(lines) + "\n").encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(n, d)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=REPO / ".whl", help="the folder (add it to .git/info/exclude)")
    ap.add_argument("--cuda", default="130", help="the image's CUDA as bitsandbytes names it (torch 2.11+cu130: 130)")
    ap.add_argument("--no_bitsandbytes", action="store_true", help="leave bitsandbytes out (8-bit AdamW rows)")
    args = ap.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    download(WHEELS + ([] if args.no_bitsandbytes else [BITSANDBYTES]), args.dest)
    for whl in args.dest.glob("bitsandbytes-*.whl"):
        a, b = keep_one_library(whl, f"libbitsandbytes_cuda{args.cuda}.so")
        print(f"{whl.name}: {a / 2**20:.1f} -> {b / 2**20:.1f} MiB (only libbitsandbytes_cuda{args.cuda}.so)")
    total = sum(p.stat().st_size for p in args.dest.glob("*.whl")) / 2**20
    print(f"{args.dest}: {total:.1f} MiB of wheels")
    if total > LIMIT_MIB:
        raise SystemExit(f"{total:.1f} MiB is over {LIMIT_MIB} MiB: the device tool carries 64 MiB with the repo")


if __name__ == "__main__":
    main()
