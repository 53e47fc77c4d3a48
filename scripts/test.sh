#!/usr/bin/env bash
# The test suite: sets everything up, then runs pytest (extra arguments pass through, e.g. -k data).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup.sh"
cd "$repo"
echo "[test $(date +%H:%M:%S)] python -m pytest $*"
exec python -m pytest "$@"
