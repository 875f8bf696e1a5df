"""Errors ProSG raises for bad input; each message names the problem and the fix."""


class ProSGError(ValueError):
    """Base class: a user-facing problem with input, config or files."""


class ConfigError(ProSGError):
    """A configuration value or combination that cannot work."""


class CheckpointError(ProSGError):
    """A checkpoint that is missing, corrupt, or does not match its config."""


class DataError(ProSGError):
    """Malformed or out-of-policy data (bad JSONL line, over-long prompt, ...)."""
