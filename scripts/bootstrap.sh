#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment on a fresh machine: the Debian packages of
# scripts/apt-packages.txt, then the pinned Python packages of requirements.txt with torch in the same pip command,
# then this package in editable mode. Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (it only does
# what is missing). scripts/test.sh also installs scripts/apt-packages-test.txt (the browser the tests drive).
#
# Which PyTorch build: CYCLE_ENCODING_TORCH=
#   auto (default)  the CPU build (torch==2.13.0+cpu) when pip finds it without asking an index (a wheel folder in
#                   pip's find-links, as on the project's own machines); otherwise PyPI's torch==2.13.0, which on
#                   Linux x86-64 is the CUDA build (about 2.5 GB more to download; it runs on a CPU too)
#   cpu             the CPU build from PyTorch's CPU index (CYCLE_ENCODING_TORCH_INDEX, default
#                   https://download.pytorch.org/whl/cpu), as an extra index: the other packages still come from PyPI
#   pypi            PyPI's torch==2.13.0 as pinned (the CUDA build on Linux x86-64; choose it for a GPU)
# The choice is part of the install stamp: changing it reinstalls.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CYCLE_ENCODING_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
TORCH_MODE="${CYCLE_ENCODING_TORCH:-auto}"
TORCH_INDEX="${CYCLE_ENCODING_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

# Debian packages of a list file (one a line, # comments): install only what is missing.
install_apt_list() {
  [[ -f "$1" ]] || return 0
  local missing=() pkg SUDO=""
  while read -r pkg; do
    [[ -z "$pkg" || "$pkg" == \#* ]] && continue
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done <"$1"
  if ((${#missing[@]})); then
    echo "[bootstrap] installing Debian packages ($(basename "$1")): ${missing[*]}"
    [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}
install_apt_list "$ROOT/scripts/apt-packages.txt"

case "$TORCH_MODE" in
  auto | cpu | pypi) ;;
  *) echo "[bootstrap] CYCLE_ENCODING_TORCH must be auto, cpu or pypi, not '$TORCH_MODE'" >&2; exit 2 ;;
esac

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[bootstrap] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi

# Re-install the pins only when requirements.txt, pyproject.toml or the torch choice changed since the last install.
stamp="$VENV/.requirements.sha256"
want="$( (sha256sum "$ROOT/requirements.txt" "$ROOT/pyproject.toml"; echo "torch=$TORCH_MODE") | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  torch_pin="$(grep -E '^torch==' "$ROOT/requirements.txt")"
  extra=()
  if [[ "$TORCH_MODE" == cpu ]]; then
    extra=(--extra-index-url "$TORCH_INDEX" "$torch_pin+cpu")
    echo "[bootstrap] PyTorch: the CPU build $torch_pin+cpu from $TORCH_INDEX"
  elif [[ "$TORCH_MODE" == auto ]] &&
    "${pip[@]}" --dry-run --no-index --no-deps --ignore-installed "$torch_pin+cpu" >/dev/null 2>&1; then
    extra=("$torch_pin+cpu")
    echo "[bootstrap] PyTorch: the CPU build $torch_pin+cpu, found without an index (pip's find-links)"
  else
    echo "[bootstrap] PyTorch: $torch_pin from PyPI (on Linux x86-64 the CUDA build; CYCLE_ENCODING_TORCH=cpu takes" \
      "the CPU build from PyTorch's CPU index instead)"
  fi
  echo "[bootstrap] installing pinned Python packages (requirements.txt)"
  "${pip[@]}" -r "$ROOT/requirements.txt" "${extra[@]}"
  # Packages that would drag in torchvision/CUDA through their own pins: installed without dependencies.
  if [[ -f "$ROOT/requirements-nodeps.txt" ]]; then
    "${pip[@]}" --no-deps -r "$ROOT/requirements-nodeps.txt"
  fi
  "${pip[@]}" --no-deps --no-build-isolation -e "$ROOT"
  echo "$want" >"$stamp"
fi
export PATH="$VENV/bin:$PATH"
