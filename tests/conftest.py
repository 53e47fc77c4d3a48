"""Shared fixtures: the real HH-RLHF copy beside the repository, the real SmolLM2 tokenizer, and a tiny random
Llama model built from it (real vocabulary and shapes, 2 layers, trains in milliseconds)."""

import os
from pathlib import Path

import pytest
import torch

# dtype="auto" is bf16 on CPUs with AMX/AVX512-BF16 and fp32 on others; the suite's numbers must not depend on the
# CPU, so "auto" means float32 here (papermill kernels inherit it). The bf16 path is tested explicitly on every CPU
# (tests/test_bf16.py), and "auto"'s own resolution by a unit test there.
os.environ["WORKBENCH_DTYPE"] = "float32"

REPO = Path(__file__).resolve().parents[1]
HH_DIR = REPO.parent / "shared" / "data" / "hh-rlhf"


# The test tiers (issue 26): `pytest -m "not slow"` is the loop a developer runs while working; the full suite is the
# README's test command and CI's. Slow: whole sweeps, pipelines and executors, several processes, JupyterLab in a
# browser, TRL's RL trainers on the oracle, and the fixtures that train and evaluate a study. Marked here, in one
# place, by what a test is built on (its module or its fixtures), besides the tests marked @pytest.mark.slow.
SLOW_MODULES = {"test_executors", "test_pipeline", "test_distributed", "test_resume", "test_widgets", "test_gold"}
SLOW_FIXTURES = {"ci_sweep", "study", "trl_rloo", "trl_grpo", "bf16", "common", "dpo_run", "kto_run", "orpo_run",
                 "cpo_run", "embedded", "runs"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.split(".")[-1] in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # GPU tests are skipped with a visible reason on machines without CUDA, never faked.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hh_dir() -> Path:
    assert (HH_DIR / "harmless-base" / "test.jsonl.gz").exists(), (
        f"The HH-RLHF test data is expected at {HH_DIR} (the shared/ folder beside the repository).")
    return HH_DIR


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """The real SmolLM2 tokenizer from the embedded default (converts the GGUF once into the cache)."""
    from workbench.modeling.models import EMBEDDED_POLICY, load_tokenizer

    return load_tokenizer(EMBEDDED_POLICY)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer) -> Path:
    from workbench.modeling.models import save_tiny_causal_lm

    return save_tiny_causal_lm(smollm_tokenizer, tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def hh_pairs(hh_dir):
    """A few real multi-turn HH pairs, short enough for fast tests."""
    from workbench.modeling.data import load_hh

    examples, _ = load_hh("harmless-base", "test", hh_dir)
    short = [ex for ex in examples if len(ex["prompt"]) >= 3
             and sum(len(m["content"]) for m in ex["prompt"] + ex["chosen"] + ex["rejected"]) < 600]
    return short[:6]
