"""The one console logger: progress and status lines, printed once by process 0.

Every console line of the library goes through :func:`say` (:func:`warn` for warnings; progress
bars stay tqdm's). The
lines go to the ``"sgpo_jax"`` :mod:`logging` logger at INFO level; when nothing has configured
that logger, the first line installs a plain ``message``-only handler on stdout, so a script or
the CLI shows them without any set-up, and an application that configures ``"sgpo_jax"`` (or
its level) decides for itself.
"""

from __future__ import annotations

import logging
import sys

import jax

__all__ = ["logger", "say", "say_once", "warn"]

logger = logging.getLogger("sgpo_jax")
_SAID: set = set()  # the messages say_once has printed in this process


def _ensure_handler() -> None:
    if logger.handlers or logger.level != logging.NOTSET:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # absl's root handler would print it a second time, with a prefix


def say(message: object) -> None:
    """Prints ``message`` once (on process 0 of a multi-host run)."""
    if jax.process_index() != 0:
        return
    _ensure_handler()
    logger.info("%s", message)


def warn(message: object) -> None:
    """:func:`say` for something the user should look at that does not stop the run: one line
    starting ``warning:``."""
    say(f"warning: {message}")


def say_once(message: str) -> None:
    """:func:`say` the first time this process sees ``message``; later calls print nothing (for
    a choice made again on every trace, e.g. which attention kernel runs)."""
    if message not in _SAID:
        _SAID.add(message)
        say(message)
