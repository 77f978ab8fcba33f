"""Exceptions of the core library.

Caller mistakes raise subclasses of ``ValueError`` naming the bad value and what is allowed.
"No room right now" is a normal outcome (``False``/``None``) and never raises.
"""


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
