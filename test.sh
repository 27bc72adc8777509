#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, then lint, types, the unit tests
# with the lowest allowed dependency versions (tests/lowest_versions.sh) and the suite.
# Extra arguments go to pytest (e.g. ./test.sh -k console).
set -euo pipefail
cd "$(dirname "$0")"
./install.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The unit tests again with the lowest version of every dependency pyproject.toml allows (~1.5 min).
nice tests/lowest_versions.sh
exec .venv/bin/python -m pytest "$@"
