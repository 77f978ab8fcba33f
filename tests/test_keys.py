import numpy as np
import pytest

from qwen3vl_ray.keys import (
    ImageSpan, Namespace, chunk_keys, content_hash, content_key, image_extras, key_from_hex, key_hex, prefix_key,
)

NS = Namespace(model="m1", dtype="float32")


def test_chain_depends_on_whole_prefix():
    a = chunk_keys(NS, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = chunk_keys(NS, [9, 2, 3, 4, 5, 6, 7, 8], 4)
    # same second chunk, different first chunk -> both keys differ
    assert a[0] != b[0] and a[1] != b[1]
    # a longer prompt shares the leading keys
    assert chunk_keys(NS, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4)[:2] == a


def test_partial_chunk_only_on_request():
    assert len(chunk_keys(NS, list(range(10)), 4)) == 2
    assert len(chunk_keys(NS, list(range(10)), 4, include_partial=True)) == 3


def test_namespace_isolates_model_dtype_and_tenant():
    toks = list(range(8))
    base = chunk_keys(NS, toks, 4)
    for other in (Namespace("m2"), Namespace("m1", dtype="bfloat16"), Namespace("m1", tenant="t2"), Namespace("m1", codec="int8")):
        assert set(chunk_keys(other, toks, 4)).isdisjoint(base)


def test_image_content_changes_key_of_same_placeholder_tokens():
    toks = [7] * 8  # image placeholder ids are all the same token
    img_a, img_b = content_hash(np.zeros(16, np.float32)), content_hash(np.ones(16, np.float32))
    ka = chunk_keys(NS, toks, 4, image_extras([ImageSpan(img_a, 0, 8)], 8, 4))
    kb = chunk_keys(NS, toks, 4, image_extras([ImageSpan(img_b, 0, 8)], 8, 4))
    assert ka[0] != kb[0] and ka[1] != kb[1]
    # the same image at another offset is another key too
    kc = chunk_keys(NS, toks, 4, image_extras([ImageSpan(img_a, 1, 8)], 8, 4))
    assert kc[0] != ka[0]


def test_content_hash_includes_shape_and_dtype():
    a = np.zeros((2, 8), np.float32)
    assert content_hash(a) != content_hash(a.reshape(4, 4))
    assert content_hash(a) != content_hash(a.astype(np.float64)[:, :8].astype(np.float32).view(np.int32))


def test_keys_are_128_bit_and_hex_roundtrip():
    k = prefix_key(NS, None, [1, 2])
    assert len(k) == 16
    assert key_from_hex(key_hex(k)) == k
    with pytest.raises(ValueError):
        key_from_hex("../../etc/passwd")
    with pytest.raises(ValueError):
        content_key(NS, "../x", b"")


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_keys(NS, [1], 0)
    with pytest.raises(ValueError, match="non-empty"):
        Namespace("")
    with pytest.raises(ValueError, match="outside"):
        image_extras([ImageSpan(b"x", 5, 20)], 10, 4)
