#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, then lint, types and the suite.
# Extra arguments go to pytest (e.g. ./test.sh -k console).
set -euo pipefail
cd "$(dirname "$0")"
./install.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
