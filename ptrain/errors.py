"""Exceptions shared by the config, compat and the modules that check flags (no ptrain imports: no import circles)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and value."""
