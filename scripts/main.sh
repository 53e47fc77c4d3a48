#!/usr/bin/env bash
# The main job on the embedded default: sets everything up, then runs `workbench main` (extra arguments pass through).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup.sh"
cd "$repo"
exec python -m workbench main "$@"
