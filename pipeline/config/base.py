"""What every config section shares: `Section` (unknown keys are errors, values frozen) and `ConfigError`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot run. The message lists every problem, one per line."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
