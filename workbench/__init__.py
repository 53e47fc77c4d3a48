"""workbench: RLHF against DPO and its variants on HH-RLHF, and a look inside the result (README.md)."""

from . import malloc

malloc.keep_freed_memory()  # before any tensor exists: freed activations are reused, not faulted back in (malloc.py)
