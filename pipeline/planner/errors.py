"""The planner's error: an input it cannot use (a memory size, a model without the needed sizes)."""

from __future__ import annotations


class PlannerError(ValueError):
    """A planner input that cannot be used (a memory size, a model without the needed sizes); says what was found."""
