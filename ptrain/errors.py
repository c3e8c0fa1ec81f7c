"""Exceptions shared by the config, compat, the entry point and the modules that check flags (no ptrain imports: no
import circles)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and value."""


class FixedSizeError(ConfigError):
    """A model that takes one frame size only (CogVideoX-5B-I2V's learned positional embeddings) refused another:
    the shape probes (ptrain.data.buckets.ShapeRules) read it as "frames and side multiple fine"."""


class RunStopped(Exception):
    """The run stopped on SIGINT / SIGTERM after a step, with a checkpoint; `code` is the exit status (128 + the
    signal's number, as a shell reports a process the signal ended)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class OutputWriteError(RuntimeError):
    """The export or the validation videos could not be written (disk full, unwritable folder, ...); the message
    says what is kept (the latest checkpoint) and what a rerun of the same command does."""
