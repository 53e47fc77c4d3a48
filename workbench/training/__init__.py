"""Objectives and arms: what is optimised, and the one skeleton that trains every arm.

``losses`` (every preference loss as a pure function with its equation), ``ppo`` and ``online_dpo`` (our own loops),
``arms`` (the table of arms: config, trainer, facts; ``register`` adds one), ``config`` (the fields every arm shares,
with their help), ``train`` (``train(method, config)``), ``gold_pairs`` (the known-gold study's labelled data),
``best_of_n``, ``cards`` (the adapter as an artifact), ``bandit`` and ``bandit_trl`` (the analytic oracle the losses and
RL arms are checked on). Imports ``core`` and ``modeling``.
"""

__all__ = ["losses", "ppo", "online_dpo", "arms", "config", "train", "gold_pairs", "best_of_n", "cards", "bandit", "bandit_trl"]
