"""How activations are captured: the `CaptureMode` a caller asks for, and the `CaptureChoice` it
resolves to on a model (`erasure_fast.attribution.resolve_capture`).

``CaptureMode`` is a ``str`` enum: the strings "auto", "engine" and "hooks" that users pass are its
values and compare equal to its members. A resolved choice keeps its mode (ENGINE or HOOKS) and the
reason for hooks (the engine does not cover the model, the model's own hooks, interventions) apart;
``str(choice)`` is the readable form results and reports show: "engine", "hooks" or "hooks (reason)".
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple, Union


class CaptureMode(str, Enum):
    """``auto``: the engine where it covers the model, else hooks; ``engine``: the forward recomputed
    from the weights (no hook machinery); ``hooks``: TransformerLens hooks."""

    AUTO = "auto"
    ENGINE = "engine"
    HOOKS = "hooks"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Union[str, "CaptureMode"], name: str = "capture") -> "CaptureMode":
        """``value`` as a member; a ValueError naming the allowed values otherwise."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}") from None


class CaptureChoice(NamedTuple):
    """What a capture request resolved to on a model: ``mode`` ENGINE or HOOKS, and for hooks the
    ``reason`` ("" when hooks were asked for and nothing else applies)."""

    mode: CaptureMode
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.mode.value} ({self.reason})" if self.reason else self.mode.value

    @classmethod
    def of(cls, value: Union["CaptureChoice", CaptureMode, str]) -> "CaptureChoice":
        """A choice from a choice, or from a resolved mode ("engine" / "hooks", no reason)."""
        if isinstance(value, CaptureChoice):
            return value
        mode = CaptureMode.parse(value, "capture_mode")
        if mode is CaptureMode.AUTO:
            raise ValueError("capture_mode must be resolved (engine or hooks), got 'auto'; see resolve_capture")
        return cls(mode)
