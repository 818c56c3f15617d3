#!/usr/bin/env bash
# Install everything the tests need, check Python 3.9 compatibility, run the suite.
#
#   bash tools/run_tests.sh [pytest args...]
#
# This is the README's test command and what .ci/run calls. It needs only Python 3.11+
# with pip, gcc and cmake; it installs the rest itself (idempotent, cached under ~/.cache).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "run_tests: installing test requirements"
"$PYTHON" -m pip install --quiet -r tools/test-requirements.txt

echo "run_tests: llama-cpp-python (built once, then reused from ~/.cache/fm-edge-wheels)"
PYTHON="$PYTHON" bash .ci/install-llama-cpp
# The llama.cpp tests must run, not skip, wherever this script installed the backend.
export FM_EDGE_REQUIRE_LLAMA_CPP=1

echo "run_tests: vermin (no syntax or stdlib newer than Python 3.9 in fmedge/)"
"$PYTHON" -c "import sys, vermin; sys.exit(vermin.main())" --no-tips --violations --eval-annotations -t=3.9- fmedge

echo "run_tests: pytest"
"$PYTHON" -m pytest -q "$@"
