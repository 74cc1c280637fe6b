"""Exceptions with messages meant for users; the CLI prints them as one line and exits 2."""


class KanmoeError(Exception):
    """Base class: anything kanmoe raises on purpose for bad input or state."""


class ConfigError(KanmoeError, ValueError):
    """A configuration key or value is invalid; the message names the key."""


class DataError(KanmoeError, ValueError):
    """Input data is missing columns, has the wrong shape, or holds non-finite values."""


class ExportError(KanmoeError):
    """An ONNX export could not be written or failed verification."""


class RunDirError(KanmoeError, FileNotFoundError):
    """A run directory is missing files that a finished training run writes."""
