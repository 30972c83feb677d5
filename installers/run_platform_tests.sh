#!/usr/bin/env bash
# Run the tests of what the installers set up that only the target OS can run for real: ConPTY
# and the Run-key autostart on Windows, the LaunchAgent on macOS (each skipped elsewhere), with
# the unit tests of the same code (fakes, every OS). The release workflow runs it on each runner;
# on Linux it is a quick check that the files collect and the fakes pass.
#
#   installers/run_platform_tests.sh [--keep-venv]
#
# A venv in build/platform-tests/venv gets the package with its test extra (on Windows, Git
# Bash: its Scripts\ folder). PYTHON picks the interpreter (default python3, or python).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/build/platform-tests/venv"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
keep_venv=0
for arg in "$@"; do
  case "$arg" in
    --keep-venv) keep_venv=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "run_platform_tests.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

venv_python="$VENV/bin/python"
[ -x "$VENV/Scripts/python.exe" ] && venv_python="$VENV/Scripts/python.exe"
if [ "$keep_venv" = 0 ] || [ ! -x "$venv_python" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  venv_python="$VENV/bin/python"
  [ -x "$VENV/Scripts/python.exe" ] && venv_python="$VENV/Scripts/python.exe"
  "$venv_python" -m pip install --quiet --upgrade pip
  "$venv_python" -m pip install --quiet ".[test]"
fi

# -p no:cacheprovider: no .pytest_cache in the checkout; the markers and timeouts come from
# pyproject.toml as in the main suite.
exec "$venv_python" -m pytest -p no:cacheprovider -q -rs \
  tests/integration/test_packaging_platform.py \
  tests/unit/core/terminal/test_conpty_windows.py \
  tests/unit/core/test_autostart.py
