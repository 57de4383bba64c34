"""The one error type a user sees for bad input. Imports nothing of the project."""


class ConfigError(ValueError):
    """Bad input found before any GPU time is spent; the message names the problem and the fix."""
