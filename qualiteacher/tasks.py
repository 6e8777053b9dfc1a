"""The four restoration tasks, in the one order every catalogue, CLI choice and config default uses.

Defined here, below every subpackage, so that the CLI, the pipeline config, the demo data and the
IQA presets share one tuple (``data.degradations.DEGRADATIONS`` holds each task's degradation).
"""
from __future__ import annotations

TASKS: tuple[str, ...] = ("dehaze", "derain", "desnow", "lowlight")
