"""The core: what every layer above reads, with no model in it.

``settings`` (the ``WORKBENCH_*`` environment variables, declared once), ``console`` (one logger per module; what the
user sees), ``methods`` (what each arm is: ``FACTS``, read by training, evaluation, tables and figures alike), ``stats``
(bootstrap and t-intervals, win rates, the length rule), ``compute`` (tokens, FLOPs, the machine's peak), ``malloc``
(the allocator's policy, set by entry points), ``distributed`` (PPO's collectives under torchrun), ``trackers``
(``report_to`` for every arm). Imports nothing of the workbench's other layers.
"""

__all__ = ["settings", "console", "methods", "stats", "compute", "malloc", "distributed", "trackers"]
