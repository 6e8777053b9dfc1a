"""Plain-text messages at a verbosity, for every layer (``qualiteacher.console`` re-exports ``say``
and sets the verbosity; this module imports nothing of the package and no Lightning)."""
from __future__ import annotations

import os
from typing import Literal

Verbosity = Literal["quiet", "normal", "verbose"]
_ORDER: tuple[Verbosity, ...] = ("quiet", "normal", "verbose")


class _State:
    verbosity: Verbosity = "normal"


def main_process() -> bool:
    """False in DDP worker processes (they re-run the command: only the main one talks)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def set_verbosity(verbosity: Verbosity) -> None:
    """The verbosity ``say`` prints at from now on."""
    _State.verbosity = verbosity


def verbosity() -> Verbosity:
    """The current verbosity."""
    return _State.verbosity


def say(text: str, level: Verbosity = "normal") -> None:
    """Print ``text`` when the verbosity is at least ``level``."""
    if main_process() and _ORDER.index(_State.verbosity) >= _ORDER.index(level):
        print(text, flush=True)
