#!/usr/bin/env bash
# Run the test suite (creates the environment on first use). Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/env.sh"
cd "$root"
# Two workers (CI has two cores); pass -n 0 to run in one process. loadgroup: the longest tests
# first, and tests sharing an expensive fixture on one worker (tests/conftest.py).
exec python -m pytest -q -n 2 --dist loadgroup --durations=25 "$@"
