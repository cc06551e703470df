#!/usr/bin/env bash
# Run the test suite (creates the environment on first use). Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/env.sh"
cd "$root"
exec python -m pytest -q --durations=25 "$@"
