"""Compression codecs. Importing this package registers every codec."""

from qwen3vl_ray.codecs.base import (  # noqa: F401
    Codec,
    IdentityCodec,
    available_codecs,
    decode,
    make_codec,
    pack_payload,
    register_codec,
    transcode,
    unpack_payload,
)
