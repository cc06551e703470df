#!/usr/bin/env bash
# Create (once) and activate the project's virtual environment in .venv.
# megatron-core 0.19 ships only CPython 3.12 wheels, so this finds a Python 3.12 first:
# $PYTHON, python3.12 on PATH, a pyenv-installed 3.12, or uv's; then installs the package.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

is_py312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

find_python() {
  local c
  for c in "${PYTHON:-}" python3.12 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && is_py312 "$(command -v "$c")" && { command -v "$c"; return; }
  done
  local roots=("${PYENV_ROOT:-}" "$HOME/.pyenv")
  for r in "${roots[@]}"; do
    [ -n "$r" ] || continue
    for c in "$r"/versions/3.12*/bin/python3.12; do
      [ -x "$c" ] && is_py312 "$c" && { echo "$c"; return; }
    done
  done
  if command -v uv >/dev/null 2>&1; then
    c="$(uv python find 3.12 2>/dev/null || true)"
    [ -n "$c" ] && is_py312 "$c" && { echo "$c"; return; }
  fi
  return 1
}

stamp="$venv/.installed-$(cat "$root/pyproject.toml" | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  py="$(find_python)" || {
    echo "error: megatron-dsa needs Python 3.12 (megatron-core 0.19 ships cp312 wheels only)." >&2
    echo "       Install one (e.g. 'pyenv install 3.12' or 'uv python install 3.12') or set PYTHON=/path/to/python3.12." >&2
    exit 1
  }
  echo "[env] creating $venv with $py" >&2
  [ -x "$venv/bin/python" ] && is_py312 "$venv/bin/python" || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e "$root[test]" >&2
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
