"""Exceptions of the core library.

Caller mistakes raise subclasses of ``ValueError`` naming the bad value and what is allowed.
"No room right now" is a normal outcome (``False``/``None``) and never raises.
"""

import re

_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")


class ConfigError(ValueError):
    """A configuration value is out of range or unknown."""


class CorruptEntryError(IOError):
    """A stored entry failed its integrity check (bad magic, checksum, truncated payload)."""


class CodecError(ValueError):
    """A payload cannot be encoded or decoded (unknown codec/version, corrupt data, bad input)."""


class CapacityError(ValueError):
    """A single entry or request can never fit, even with everything else evicted."""


class ClusterError(ConnectionError):
    """The Ray cluster cannot be used from here: nothing answers at the address, or it refuses this process
    (token authentication without the token). The message names the address and the fix."""


def error_line(e: BaseException, limit: int = 1000) -> str:
    """One line naming an error, for a row's ``error`` or a status report, e.g. ``ValueError: bad image``.

    Errors that crossed a process boundary carry the original inside: Ray's ``RayTaskError`` keeps it as
    ``cause``, and an actor that failed to start puts it, module path and all, in its own message between
    tracebacks. The line is the original's: the cause if there is one, else the last ``SomeError: ...`` line of
    the message (without the exception class's module path), else the type and the message's last line."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if _ERROR_LINE.match(ln)]
    text = named[-1] if named else f"{type(e).__name__}: {lines[-1] if lines else ''}".strip()
    text = re.sub(r"^(?:[a-z_]\w*\.)+", "", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
