"""The command-line error contract: an expected error is one line on stderr and exit code 2.

Expected errors are the ones a person can act on: a missing or unreadable file or folder, a bad
value or configuration, a refused checkpoint, an unreachable tracking server, a missing weight
file. They are printed as ``error: <message>`` on one line (multi-line messages are joined) and
the command exits with 2; ``--debug`` re-raises them with the traceback. An interrupt exits 130.
A ``KeyError`` whose message starts with "unknown " (a name the user gave that is not in a
catalogue) counts as expected too. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn, TextIO

# OSError covers missing files and folders, permissions, unreachable servers (ConnectionError);
# ValueError covers bad values, configuration errors, unreadable images and refused checkpoints.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)

USER_ERROR = 2
INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` under the contract: a wrong invocation (unknown choice, bad
    number, missing argument) is one line on stderr and exit code 2; ``--help`` shows the usage.
    Sub-command parsers made with ``add_subparsers`` inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR, f"error: {self.prog}: {' '.join(message.split())} (see: {self.prog} --help)\n")


def expected_errors() -> tuple[type[BaseException], ...]:
    """:data:`EXPECTED_ERRORS` plus the libraries' own configuration errors when importable."""
    extra: list[type[BaseException]] = []
    try:
        # lazy: every command loads this module; lightning takes 4 s to import
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        extra.append(MisconfigurationException)
    except ImportError:  # pragma: no cover - lightning is a dependency
        pass
    try:
        # lazy: every command loads this module; mlflow takes 1.5 s to import
        from mlflow.exceptions import MlflowException

        extra.append(MlflowException)
    except ImportError:  # pragma: no cover - mlflow is a dependency
        pass
    return EXPECTED_ERRORS + tuple(extra)


def error_line(err: BaseException) -> str:
    """The message of ``err`` on one line (lines joined, blanks squeezed)."""
    text = str(err)
    if isinstance(err, KeyError) and err.args:  # KeyError quotes its message
        text = str(err.args[0])
    if isinstance(err, OSError) and err.filename and not text.strip():
        text = f"{err.strerror or type(err).__name__}: {err.filename}"
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return " ".join(parts) or type(err).__name__


def run_with_contract(fn: Callable[[], int], debug: bool = False, stream: TextIO | None = None) -> int:
    """Run ``fn`` (a command body returning its exit code) under the error contract."""
    stream = stream or sys.stderr
    try:
        return fn()
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=stream)
        return INTERRUPTED
    except expected_errors() as err:
        if debug:
            raise
        print(f"error: {error_line(err)}", file=stream)
        return USER_ERROR
    except KeyError as err:  # a failed lookup of a name the user gave ("unknown IQA preset 'x'; ...")
        if debug or not str(err.args[0] if err.args else "").startswith("unknown "):
            raise
        print(f"error: {error_line(err)}", file=stream)
        return USER_ERROR
