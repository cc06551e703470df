#!/usr/bin/env bash
# The main job (creates the environment on first use). Extra args go to the job.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/env.sh"
cd "$root"
exec python -m megatron_dsa.train.main "$@"
