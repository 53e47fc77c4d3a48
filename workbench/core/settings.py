"""The workbench's environment variables, declared in one place: each one's name, meaning and default (``VARIABLES``),
read through ``get`` where it is used, and recorded with every run (``env.json``: ``runs.environment``).

Read at each call, not once at import: importing the workbench reads and changes nothing, and a notebook or a test
that sets a variable before a call is heard. A config field always wins over its variable (``runs_dir`` over
``WORKBENCH_RUNS``, ``DataConfig.source`` over ``WORKBENCH_HH_SOURCE``, ``ModelConfig.dtype`` is overridden by
``WORKBENCH_DTYPE`` only where the help says so).
"""

from __future__ import annotations

import os
from pathlib import Path

# the checkout the package sits in (notebooks/, grids/, papers/, data/; ../shared beside it): named once, here
REPO = Path(__file__).resolve().parents[2]

VARIABLES = {
    "WORKBENCH_RUNS": "where run folders go when a config's runs_dir is None (default: ./runs)",
    "WORKBENCH_CACHE": "where converted weights (the embedded GGUF models) are cached (default: ~/.cache/workbench)",
    "WORKBENCH_HH_SOURCE": "the HH-RLHF copy read when DataConfig.source is None: a directory laid out like "
                           "anthropics/hh-rlhf, or \"hub\" (default: a local copy beside the repository, else the hub)",
    "WORKBENCH_DTYPE": "forces the compute dtype of dtype=\"auto\" (float32 or bfloat16), e.g. to compare a CPU "
                       "without native bf16 (default: the hardware's rule, models.compute_dtype)",
    "WORKBENCH_MALLOC": "\"system\" leaves glibc's allocator as it is instead of keeping freed memory (malloc.py)",
    "WORKBENCH_VERBOSITY": "how much the console shows: debug, info or warning; --verbose / --quiet set it, and a "
                           "sweep's kernels inherit it (default: info)",
}


def get(name: str) -> str | None:
    """The value of the workbench's environment variable ``name`` (None where unset or empty)."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not one of the workbench's environment variables ({', '.join(VARIABLES)}).")
    return os.environ.get(name) or None


def in_effect() -> dict:
    """{name: value} of the variables set in this process (what env.json records)."""
    return {name: os.environ[name] for name in VARIABLES if os.environ.get(name)}
