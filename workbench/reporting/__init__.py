"""Reporting: what a person reads and looks at.

``figures`` (the paper's figures from the results table), ``paper`` (the draft from its template), ``widgets`` (the
inspector). Imports the layers below.
"""

__all__ = ["figures", "paper", "widgets"]
