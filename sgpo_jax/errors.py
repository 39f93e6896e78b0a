"""Errors the user can fix. The CLI prints them as one ``error: ...`` line (exit status 2)
instead of a traceback; everything else is an internal error and keeps its traceback."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "DeviceMemoryError", "DivergenceError", "ModelError",
           "UserError", "WorkdirLocked"]


class UserError(Exception):
    """A problem with the user's input or environment (config, data, checkpoint, hub name,
    memory). ``hint``: at most one short line naming what to change (a flag), or ""."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class ConfigError(UserError, ValueError):
    """An invalid config: every problem listed at once."""


class DataError(UserError, ValueError):
    """Preference data that cannot be read or used: names the file, the line or row, the field
    and why."""


class ModelError(UserError, ValueError):
    """A model source that cannot be loaded: a missing or malformed checkpoint, an unsupported
    architecture, a hub name that cannot be reached."""


class CheckpointError(UserError, ValueError):
    """A training checkpoint that does not fit this run (other data, shard count or settings)."""


class DeviceMemoryError(UserError, MemoryError):
    """The run does not fit the device memory; the message names the settings that reduce it."""


class DivergenceError(UserError, FloatingPointError):
    """Training diverged (non-finite loss or gradients) or died (vanishing gradients, exploding
    weights): names the step, the last finite checkpoint and the likely cause."""


class WorkdirLocked(UserError):
    """Another live process holds the run directory's lock: names its pid and host."""
