"""Exceptions with messages meant for users; the CLI prints them as one line and exits 2."""


class KanmoeError(Exception):
    """Base class: anything kanmoe raises on purpose for bad input or state."""


class ConfigError(KanmoeError, ValueError):
    """A configuration key or value is invalid; the message names the key."""


class DataError(KanmoeError, ValueError):
    """Input data is missing columns, has the wrong shape, or holds non-finite values."""


class TrainingError(KanmoeError):
    """Training cannot produce a model (the loss went non-finite before any usable epoch)."""


class ExportError(KanmoeError):
    """An ONNX export could not be written or failed verification."""


class RunDirError(KanmoeError, FileNotFoundError):
    """A run directory is missing a file that a finished run writes, or holds a broken one.

    The message names the file, so a user knows which one to restore or retrain.
    """


def one_line(text: object) -> str:
    """Collapse a (possibly multi-line) message into one line: the CLI promises one line."""
    out = ""
    for line in (line.strip() for line in str(text).splitlines()):
        if line:
            out += (" " if not out or out.endswith(":") else "; ") + line
    return out.strip()


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors can be pages long)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
