"""Wheels of ptrain's dependencies except torch, for installing on a machine with no network (launch/wheelhouse.sh).

1. resolve: `pip install --dry-run --ignore-installed --report` of pyproject's dependencies (minus torch) for the
   target python / platform, binary wheels only;
2. keep the resolved packages reachable from them without going through torch (torch's own dependencies - CUDA
   libraries, triton, sympy... - come with the image's torch) and not already in --exclude-from at a version that
   satisfies what needs it;
3. download: `pip download --no-deps --only-binary=:all:` of exactly those versions into DIR.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # pip always carries it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SKIP = {"torch"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extras: list[str]) -> list[str]:
    """pyproject's dependencies (and `extras`' and the build backend's), without torch."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    reqs = list(project["dependencies"]) + list(pyproject["build-system"]["requires"])  # setuptools: `pip install .`
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [r for r in reqs if norm(Requirement(r).name) not in SKIP]


def present(path: str | None) -> dict[str, str | None]:
    """--exclude-from: `name==version` lines (pip freeze / `pip list --format=freeze`) or bare names."""
    out = {}
    for line in Path(path).read_text().splitlines() if path else []:
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[norm(name)] = version.strip() or None
    return out


def pip_args(args) -> list[str]:
    return ["--only-binary=:all:", "--python-version", args.python_version, "--platform", args.platform]


def resolve_command(args, reqs: list[str], report: str) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", report,
            *pip_args(args), *reqs]  # fmt: skip


def download_command(args, pins: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", *pip_args(args), "-d", args.dir, *pins]


def closure(report: dict, reqs: list[str], have: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """(`name==version` to download, names left out because the image has them) from a pip installation report."""
    resolved = {norm(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
    wanted: dict[str, list[Requirement]] = {}
    todo = [Requirement(r) for r in reqs]
    while todo:
        req = todo.pop()
        name = norm(req.name)
        if name in SKIP or name not in resolved:  # torch's subtree, or a marker that excluded it for the target
            continue
        first = name not in wanted
        wanted.setdefault(name, []).append(req)
        if first:
            for dep in resolved[name].get("requires_dist") or []:
                d = Requirement(dep)
                if (
                    d.marker is None
                    or "extra" not in str(d.marker)
                    or any(d.marker.evaluate({"extra": e}) for e in req.extras)
                ):
                    todo.append(d)
    pins, kept = [], []
    for name, reqs_on in sorted(wanted.items()):
        version = have.get(name, "") if name in have else ""
        if name in have and (version is None or all(Version(version) in r.specifier for r in reqs_on)):
            kept.append(name)
        else:
            pins.append(f"{name}=={resolved[name]['version']}")
    return pins, kept


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bash launch/wheelhouse.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="folder the wheels go to")
    ap.add_argument("--python-version", default="3.12", help="target python (default 3.12)")
    ap.add_argument(
        "--platform",
        default="manylinux_2_28_x86_64",
        help="target wheel platform (default manylinux_2_28_x86_64; also accepts older manylinux wheels)",
    )
    ap.add_argument("--exclude-from", help="the image's packages (`pip list --format=freeze` there): left out if "
                    "their version satisfies ptrain's needs")  # fmt: skip
    ap.add_argument("--extras", default="", help="comma-separated extras of ptrain to include, e.g. wandb,cuda")
    ap.add_argument("--print", action="store_true", help="print the pip commands and the requirements; run nothing")
    args = ap.parse_args(argv)
    reqs = requirements([e for e in args.extras.split(",") if e])
    with tempfile.TemporaryDirectory() as tmp:
        report = str(Path(tmp) / "report.json")
        resolve = resolve_command(args, reqs, report)
        if args.print:
            print(shlex.join(resolve))
            print(shlex.join(download_command(args, ["<resolved name==version ...>"])))
            return 0
        subprocess.run(resolve, check=True)
        pins, kept = closure(json.loads(Path(report).read_text()), reqs, present(args.exclude_from))
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    subprocess.run(download_command(args, pins), check=True)
    (Path(args.dir) / "requirements.txt").write_text("".join(p + "\n" for p in pins))
    size = sum(f.stat().st_size for f in Path(args.dir).glob("*.whl")) / 1e6
    print(f"{len(pins)} wheels ({size:.0f} MB) in {args.dir}" + (f"; left out (the image has them): {', '.join(kept)}"
          if kept else "") + f"\ninstall there: bash launch/setup.sh --wheelhouse {args.dir} --system-torch")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
