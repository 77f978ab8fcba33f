"""Compression codecs. Importing this package registers every codec.

``make_codec(spec)`` builds one (``"int8"``, ``"int4:group=64,axis=-1"``, ``"kv-int4:residual=32"``,
``"int8+zstd"``, ``"auto:max_error=0.02"``); ``decode(payload, device)`` decodes any payload;
``transcode(payload, spec)`` re-encodes a stored payload with another codec.
"""

from qwen3vl_ray.codecs.base import (  # noqa: F401
    Codec,
    IdentityCodec,
    available_codecs,
    decode,
    make_codec,
    pack_payload,
    register_codec,
    relative_error,
    transcode,
    unpack_payload,
)
from qwen3vl_ray.codecs import auto, cast, kv, lossless, lowrank, quant  # noqa: F401,E402  (registers codecs)
