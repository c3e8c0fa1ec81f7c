#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed). Extra arguments go to pytest.
#
# The suite runs in PTRAIN_TEST_WORKERS pytest-xdist workers (default: the CPU count, at most 4; 0 or 1: one
# process), each test file on one worker (--dist loadfile: a file's shared runs stay together). Much of a test's
# time is one subprocess importing torch and diffusers or waiting on another, so 2 workers on 2 cores keep both
# busy. Arguments given here come last and win (e.g. `-n 0`, `-p no:xdist`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
cores=$(.venv/bin/python -c "import os; print(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())")
workers=${PTRAIN_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
xdist=()
if [ "$workers" -gt 1 ] && .venv/bin/python -c "import xdist" 2>/dev/null; then
  xdist=(-n "$workers" --dist loadfile)
fi
exec .venv/bin/python -m pytest -q "${xdist[@]}" "$@"
