"""``OUT/state.json``: the pipeline's MLflow run ids and which stages are done; ``OUT/pipeline.lock``:
one run per output folder.

A finished stage is skipped on rerun; an interrupted one resumes from its last checkpoint in the
same MLflow run.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any


class PipelineState:
    """``state.json``: parent run id, per-stage child run ids and completion, written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"stages": {}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {})

    def done(self, name: str) -> bool:
        return bool(self.data["stages"].get(name, {}).get("done"))


class FolderInUse(OSError):
    """Another live process runs a pipeline (or study) in the same output folder."""


class FolderLock:
    """``OUT/pipeline.lock``: one pipeline or study per output folder at a time.

    The lock is an exclusive ``flock`` on the file, which the kernel releases when its process
    ends however it ends (a SIGKILL included), so a stale lock of a dead process is simply taken
    over (``took_over`` names its PID). The file holds the holder's PID, host, start time and
    command, for the message a second process gets (:class:`FolderInUse`, at once, no waiting).
    On a file system without ``flock`` the PID alone decides: a live process on this host holds it.
    """

    NAME = "pipeline.lock"

    def __init__(self, folder: Path, command: str = "") -> None:
        self.path = Path(folder) / self.NAME
        self.command = command
        self.took_over: str | None = None
        self._fd: int | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _busy(self, holder: dict[str, Any]) -> FolderInUse:
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}"
               + (f": {holder['command']}" if holder.get("command") else ""))
        return FolderInUse(f"output folder {self.path.parent} is in use by another run ({who}); wait for it "
                           f"to end, or give this run another output folder (--out_dir / --out)")

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = self._holder()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy(holder) from None
        except OSError:  # no flock here (some network file systems): the PID decides
            if holder.get("host") == socket.gethostname() and _alive(holder.get("pid")) \
                    and holder.get("pid") != os.getpid():
                os.close(fd)
                raise self._busy(holder) from None
        if holder.get("pid"):
            self.took_over = f"pid {holder['pid']} on {holder.get('host', '?')} (no longer running)"
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file: free (the file stays: deleting it would race)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
