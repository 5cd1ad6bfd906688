"""Shared base for every config section: unknown keys are errors, values are validated on assignment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of all config sections. `extra="forbid"` makes typos fail loudly (DESIGN.md rule 5)."""

    # hide_input_in_errors: str(ValidationError) would print every rejected value (a pasted API key included);
    # load.format_errors decides what may be echoed.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, hide_input_in_errors=True)
