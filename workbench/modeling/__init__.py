"""Data and models: rows in, log-probabilities and samples out, and the run folder they are kept in.

``data`` and ``sources`` (HH-RLHF and your data in TRL's formats, views per arm, the held-out split), ``models``
(4-bit + LoRA policies, reward models, tokenizers), ``logprobs``, ``inference``, ``decoding`` and ``sampling`` (one
sampler for every place that generates), ``scoring`` (pairs scored per pair and per token; one pair measure),
``rewards`` and ``judge`` (reward functions: a reward model, the built-in gold, an AI judge), ``runs`` (the run-folder
contract). Imports only ``core``.
"""

__all__ = ["data", "sources", "models", "logprobs", "inference", "decoding", "sampling", "scoring", "rewards", "judge", "runs"]
