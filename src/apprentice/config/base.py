"""Shared base for every config section: unknown keys are errors, values are validated on assignment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of all config sections. `extra="forbid"` makes typos fail loudly (DESIGN.md rule 5)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
