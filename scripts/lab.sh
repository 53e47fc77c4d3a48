#!/usr/bin/env bash
# The notebooks in JupyterLab: sets everything up, registers this environment as the Jupyter kernel "workbench"
# (for any other Jupyter you use), then starts JupyterLab on notebooks/ (extra arguments pass through to
# `jupyter lab`, e.g. --port 8890 --no-browser).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup.sh"
cd "$repo"
python -m ipykernel install --user --name workbench --display-name "workbench (${VIRTUAL_ENV:-.venv})" >/dev/null
echo "[lab $(date +%H:%M:%S)] kernel 'workbench' registered; starting JupyterLab on notebooks/"
exec python -m jupyter lab --notebook-dir "$repo/notebooks" "$@"
