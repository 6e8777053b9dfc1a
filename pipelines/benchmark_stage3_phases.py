"""Phase timing of a stage-3 step for ``benchmark_stage3.py``: a clock of exclusive phases, the
graders' share of the backward pass, and the wrappers that time a ``QualiTeacherModule``'s parts."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

PHASES = ("teacher views", "candidate grading", "masks", "student fwd", "student bwd", "reward fwd",
          "reward bwd", "consistency", "bank", "optimizer/EMA", "other")


class PhaseClock:
    """Exclusive time per phase, plus ``graders``: time inside the IQA ensemble, counted once however
    calls nest. ``wall``: ``perf_counter`` (with ``torch.cuda.synchronize`` at every boundary on
    CUDA); ``cpu``: the process's CPU time, which other processes on a shared machine do not inflate."""

    def __init__(self, device: torch.device, kind: str = "wall") -> None:
        self.cuda = device.type == "cuda"
        self._read = time.process_time if kind == "cpu" else time.perf_counter
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []  # [name, absorbing, resumed_at]
        self._grader_depth = 0
        self._grader_t0 = 0.0

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return self._read()

    @contextmanager
    def phase(self, name: str, absorb: bool = False) -> Iterator[None]:
        if self._stack and self._stack[-1][1]:  # inside an absorbing phase: counted there
            yield
            return
        t = self.now()
        if self._stack:
            self.totals[self._stack[-1][0]] += t - self._stack[-1][2]
        self._stack.append([name, absorb, t])
        try:
            yield
        finally:
            t = self.now()
            top = self._stack.pop()
            self.totals[top[0]] += t - top[2]
            if self._stack:
                self._stack[-1][2] = t

    @contextmanager
    def graders(self) -> Iterator[None]:
        if self._grader_depth == 0:
            self._grader_t0 = self.now()
        self._grader_depth += 1
        try:
            yield
        finally:
            self._grader_depth -= 1
            if self._grader_depth == 0:
                self.totals["graders"] += self.now() - self._grader_t0

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds

    def reset(self) -> None:
        self.totals.clear()


def wrap(obj: Any, attr: str, fn: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``obj.attr`` (an instance attribute shadowing the method) by ``fn(original)``."""
    setattr(obj, attr, fn(getattr(obj, attr)))


def timed(clock: PhaseClock, name: str, absorb: bool = False, grader: bool = False):
    def deco(orig: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with clock.phase(name, absorb):
                if not grader:
                    return orig(*args, **kwargs)
                with clock.graders():
                    return orig(*args, **kwargs)
        return call
    return deco


class BackwardSplit:
    """Hooks that time the backward pass through each reward call (its output's gradient arriving
    -> its input's gradient computed); the union of those intervals is the graders' share of a
    backward pass (the intervals of several reward calls nest: their gradients arrive together),
    the rest is the student's."""

    def __init__(self, clock: PhaseClock) -> None:
        self.clock = clock
        self.intervals: list[tuple[float, float]] = []

    def watch(self, images: Tensor, reward: Tensor) -> None:
        if not (images.requires_grad and reward.requires_grad):
            return
        start: list[float] = []
        reward.register_hook(lambda g: start.append(self.clock.now()))

        def done(g: Tensor) -> None:
            if start:
                self.intervals.append((start.pop(), self.clock.now()))
        images.register_hook(done)

    @property
    def seconds(self) -> float:
        total, end = 0.0, float("-inf")
        for a, b in sorted(self.intervals):
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    @contextmanager
    def backward(self) -> Iterator[None]:
        """A backward pass: its time is "student bwd" except the graders' share ("reward bwd")."""
        self.intervals = []
        with self.clock.phase("student bwd", absorb=True):
            yield
        graders = self.seconds
        self.clock.add("student bwd", -graders)
        self.clock.add("reward bwd", graders)
        self.clock.add("graders", graders)


def instrument(module: Any, clock: PhaseClock, split: BackwardSplit) -> None:
    """Time a ``QualiTeacherModule``'s parts in place (instance attributes only)."""
    ens = module.ensemble
    wrap(module.teacher, "forward", timed(clock, "teacher views", absorb=True))
    wrap(ens, "forward", timed(clock, "candidate grading", absorb=True, grader=True))
    wrap(module, "_masks", timed(clock, "masks", absorb=True))
    wrap(module.student, "forward", timed(clock, "student fwd"))
    wrap(module, "_crop_consistency", timed(clock, "consistency", absorb=True))
    for name in ("accepts", "offer_batch", "gather"):
        wrap(module.bank, name, timed(clock, "bank"))

    def reward(orig: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def call(images: Tensor) -> Tensor:
            with clock.phase("reward fwd", absorb=True), clock.graders():
                out = orig(images)
            split.watch(images, out)
            return out
        return call
    wrap(module, "_reward", reward)

    def backward(orig: Callable[..., None]) -> Callable[..., None]:
        def call(*args: Any, **kwargs: Any) -> None:
            with split.backward():
                orig(*args, **kwargs)
        return call
    wrap(module, "backward", backward)
    # optimizer_step runs Lightning's closure (training_step + backward): their parts are
    # phases of their own, the rest of training_step is "other"
    wrap(module, "training_step", timed(clock, "other"))
    wrap(module, "optimizer_step", timed(clock, "optimizer/EMA"))
