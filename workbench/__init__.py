"""workbench: RLHF against DPO and its variants on HH-RLHF, and a look inside the result (README.md)."""

# Importing the workbench does no work: no environment variable, RNG or allocator setting changes (a test checks).
# The entry points that train, sample or evaluate (``train.train``, ``evaluate.evaluate_runs``, the command line)
# set the C allocator's policy for themselves (``malloc.keep_freed_memory``).

import logging
import warnings

# Known, harmless warnings, silenced where they arise; everything else still shows.
# peft 0.21 and TRL 1.16 read the model's old `is_gradient_checkpointing` name, which transformers 5 deprecates
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# TRL 1.16's configs declare `gradient_checkpointing` (TRL's default True), which transformers 5 renamed
# `activation_checkpointing` and maps over itself; the warning fires for every TRL config, whatever the user set
warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)


class _NoHubKernel(logging.Filter):
    """bitsandbytes tries the optional `kernels` package's CPU 4-bit kernel, which would come from the hub this
    workbench never reaches, and falls back to its own kernel; the one line it logs about that is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernel())


