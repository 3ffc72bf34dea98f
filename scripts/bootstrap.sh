#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment on a fresh machine: Debian packages listed in
# scripts/apt-packages.txt, then the pinned Python packages of requirements.txt (torch in the same pip
# command, so pip never pulls a CUDA build), then this package in editable mode.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (it only does what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CYCLE_ENCODING_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

# Debian packages (data sets, browsers for the report test, ...): install only what is missing.
if [[ -f "$ROOT/scripts/apt-packages.txt" ]]; then
  missing=()
  while read -r pkg; do
    [[ -z "$pkg" || "$pkg" == \#* ]] && continue
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done <"$ROOT/scripts/apt-packages.txt"
  if ((${#missing[@]})); then
    echo "[bootstrap] installing Debian packages: ${missing[*]}"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[bootstrap] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi

# Re-install the pins only when requirements.txt changed since the last successful install.
stamp="$VENV/.requirements.sha256"
want="$(sha256sum "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[bootstrap] installing pinned Python packages (requirements.txt)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
  # Packages that would drag in torchvision/CUDA through their own pins: installed without dependencies.
  if [[ -f "$ROOT/requirements-nodeps.txt" ]]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$ROOT/requirements-nodeps.txt"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
  echo "$want" >"$stamp"
fi
export PATH="$VENV/bin:$PATH"
