"""Write tests/data/test_seconds.json from a pytest JUnit XML report (`pytest --junitxml FILE`, best from a
`PTRAIN_TEST_HEAVY=1` run, so that every test has a time): conftest orders the files of a pytest-xdist run by
it, longest first.

    python tests/record_seconds.py FILE.xml [--note "how the run was made"]
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "test_seconds.json"


def node_id(classname: str, name: str) -> str:
    """JUnit's `tests.test_x` + `test_f[p]` -> `tests/test_x.py::test_f[p]` (ptrain's tests are functions)."""
    return f"{classname.replace('.', '/')}.py::{name}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("junit", type=Path)
    ap.add_argument("--note", default="", help="how the recorded run was made (machine, workers, commit)")
    args = ap.parse_args(argv)
    seconds = {}
    for case in ET.parse(args.junit).getroot().iter("testcase"):
        if case.find("skipped") is None:
            seconds[node_id(case.get("classname", ""), case.get("name", ""))] = round(float(case.get("time", 0)), 2)
    unknown = [n for n in seconds if not (HERE.parent / n.split("::")[0]).is_file()]
    if unknown:
        raise SystemExit(f"{len(unknown)} test ids name no file here (e.g. {unknown[0]}): run pytest from the repo root")
    OUT.write_text(json.dumps({"about": "Seconds per test of one recorded run, for ordering pytest-xdist files "
                               "(tests/conftest.py). " + args.note, "seconds": dict(sorted(seconds.items()))},
                              indent=1) + "\n")  # fmt: skip
    print(f"{OUT}: {len(seconds)} tests, {sum(seconds.values()) / 60:.1f} test-minutes")


if __name__ == "__main__":
    main()
