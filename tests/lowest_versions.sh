#!/usr/bin/env bash
# Runs the unit tests (those that boot no guest) against the LOWEST version of every dependency
# pyproject.toml allows, so that a floor cannot lie (issue 11: structlog>=24.1 while logs.py used
# an argument that only 25.5 has). Every `name>=X` in [project].dependencies and
# [build-system].requires becomes `name==X` in a pip constraints file; PIP_CONSTRAINT also reaches
# pip's isolated build environment, so the setuptools floor is built with too. The test tools
# themselves (pytest, ...) are whatever pip picks: they are not what we ship.
# Usage: tests/lowest_versions.sh [pytest args]   (default: the fast, guest-free set below, ~1 min;
# not test_cli_extras: docs/schema.json is rendered by the newest msgspec, whose wording differs)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-lowest
constraints="$venv/constraints.txt"
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
/usr/bin/python3 - >"$constraints.new" <<'PY'
import re, sys, tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)
specs = project["project"]["dependencies"] + project["build-system"]["requires"]
for spec in specs:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(?:,.*)?", spec)
    if not match:
        sys.exit(f"lowest_versions.sh: cannot find the floor of {spec!r}: write it as name>=X")
    print(f"{match.group(1)}=={match.group(2)}")
PY
mv "$constraints.new" "$constraints"
export PIP_CONSTRAINT="$PWD/$constraints" PIP_DISABLE_PIP_VERSION_CHECK=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --force-reinstall of the runtime deps only when the constraints changed is not worth the logic:
# pip with a satisfied constraint does nothing, and a changed floor is re-resolved.
if ! "$venv/bin/pip" install -q -e . "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" >"$log" 2>&1; then
  cat "$log" >&2
  echo "lowest_versions.sh: the lowest allowed versions ($(tr '\n' ' ' <"$constraints")) do not install or build; raise the floor in pyproject.toml" >&2
  exit 1
fi
echo "lowest_versions.sh: testing with $(tr '\n' ' ' <"$constraints")" >&2
if [ "$#" = 0 ]; then
  set -- -q -m "not vm" -p no:cacheprovider \
    tests/test_logs.py tests/test_notify.py tests/test_qmp.py tests/test_kvm_watch.py \
    tests/test_control.py tests/test_bad_input.py tests/test_children.py tests/test_pid1.py tests/test_xdg.py
fi
exec "$venv/bin/python" -m pytest "$@"
