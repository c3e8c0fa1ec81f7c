"""README.md's figures are generated from benchmarks/results/ (benchmarks/readme.py); no training here."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _readme_module():
    spec = importlib.util.spec_from_file_location("bench_readme", REPO / "benchmarks" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_matches_results():
    """`python benchmarks/readme.py --check` passes: every generated section equals what the results files give."""
    run = subprocess.run(
        [sys.executable, "benchmarks/readme.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_check_catches_a_typed_figure_and_stray_markers():
    readme = _readme_module()
    text = (REPO / "README.md").read_text()
    ci = readme.load("ci.json")
    typed = text.replace(f"ran {ci['tests']} tests", f"ran {ci['tests'] + 1} tests")
    assert typed != text
    assert readme.regenerate(typed) == text  # the hand edit is overwritten from ci.json
    with pytest.raises(SystemExit, match="unknown"):
        readme.regenerate(text + "<!-- results:nothing -->1<!-- /results:nothing -->")
    with pytest.raises(SystemExit, match="missing"):
        readme.regenerate(text.replace("<!-- results:ci -->", "").replace("<!-- /results:ci -->", ""))


def test_every_block_says_where_and_when():
    readme = _readme_module()
    for name, block in readme.BLOCKS.items():
        out = block()
        assert "benchmarks/results/" in out, name
        assert re.search(r"\d{4}-\d\d-\d\d", out), name
