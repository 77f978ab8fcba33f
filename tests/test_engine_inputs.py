"""Hostile or odd engine input: each case fails its own request with an error naming the field, image or
token, while the other requests of the same call complete; EXIF-rotated photos match plain transformers."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageFile

from qwen3vl_ray.engine.config import EngineConfig
from qwen3vl_ray.engine.images import ImageError, load_image
from qwen3vl_ray.engine.prompt import _template_messages, build_prompt
from qwen3vl_ray.engine.requests import Request, RequestError, SamplingParams
from tests.helpers_engine import MAX_PIXELS, chat, check_isolated, ckpt, engine, picture  # noqa: F401 (ckpt, engine: fixtures)

def png(width, height, complete=True):
    """A grayscale PNG of ``width`` x ``height`` black pixels, built row by row so the test never holds
    the decoded image. ``complete=False`` writes the header and one row only (a bomb's header)."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = bytes(1 + width)  # filter byte 0 + one byte per pixel
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height if complete else 1)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def decoded_sizes(monkeypatch):
    """Sizes of every file-backed image PIL decodes during the test (ImageFile.load reads the pixels when
    tiles are still pending; later calls on a loaded image are no-ops and are not counted)."""
    sizes = []
    original = ImageFile.ImageFile.load

    def spy(self):
        if self.tile:
            sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return sizes


# -- sampling values -------------------------------------------------------------------------------

BAD_SAMPLING = [
    ({"temperature": math.nan}, "temperature must be finite, got nan"),
    ({"temperature": math.inf}, "temperature must be finite, got inf"),
    ({"temperature": -math.inf}, "temperature must be finite, got -inf"),
    ({"temperature": "hot"}, "temperature must be a number, got str 'hot'"),
    ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
    ({"top_p": math.nan}, "top_p must be finite, got nan"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_p": None}, "top_p must be a number, got NoneType None"),
    ({"seed": "abc"}, "seed must be an int, got str 'abc'"),
    ({"seed": 1.5}, "seed must be an int, got float 1.5"),
    ({"seed": True}, "seed must be an int, got bool True"),
    ({"seed": -(1 << 63) - 1}, "seed must be in [-2**63, 2**64), got -9223372036854775809"),
    ({"seed": 1 << 64}, "seed must be in [-2**63, 2**64), got 18446744073709551616"),
    ({"max_new_tokens": True}, "max_new_tokens must be an int >= 1, got bool True"),
    ({"max_new_tokens": 4.0}, "max_new_tokens must be an int >= 1, got float 4.0"),
    ({"max_new_tokens": "8"}, "max_new_tokens must be an int >= 1, got str '8'"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, got 0"),
    ({"stop_on_eos": "no"}, "stop_on_eos must be a bool, got str 'no'"),
]


@pytest.mark.parametrize("kwargs, message", BAD_SAMPLING, ids=[repr(k) for k, _ in BAD_SAMPLING])
def test_bad_sampling_value_is_a_request_error_naming_field_and_value(kwargs, message):
    with pytest.raises(RequestError) as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)


def test_sampling_value_changed_after_construction_is_checked_too():
    sp = SamplingParams(temperature=0.7)
    with pytest.raises(RequestError, match="temperature must be finite"):
        sp.temperature = math.nan
    assert sp.temperature == 0.7  # the bad value never landed


def test_numpy_scalars_and_ints_are_accepted_as_plain_numbers():
    sp = SamplingParams(max_new_tokens=np.int64(4), temperature=1, top_p=np.float32(0.5), seed=np.uint64(7))
    assert (sp.max_new_tokens, sp.temperature, sp.top_p, sp.seed) == (4, 1.0, 0.5, 7)
    assert type(sp.max_new_tokens) is int and type(sp.temperature) is float and type(sp.seed) is int


def test_tiny_temperature_samples_like_greedy_instead_of_failing(engine):
    # 1e-300 is 0 in float32: logits / it would be +-inf and the probabilities NaN; the sampler shifts by
    # the max and floors the temperature, so the argmax gets all the mass
    msgs = chat(picture(), "Hi")
    greedy, tiny = engine.generate([Request(msgs, SamplingParams(max_new_tokens=4)),
                                    Request(msgs, SamplingParams(max_new_tokens=4, temperature=1e-300, seed=5))])
    assert greedy.ok and tiny.ok, tiny.error
    assert tiny.token_ids == greedy.token_ids


@pytest.mark.parametrize("sampling, needle", [
    ({"temperature": math.nan, "max_new_tokens": 3}, "temperature must be finite"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"seed": "abc", "temperature": 0.5}, "seed must be an int"),
    ({"max_new_tokens": True}, "max_new_tokens must be an int >= 1, got bool True"),
])
def test_bad_sampling_in_a_json_request_fails_only_that_request(engine, sampling, needle):
    check_isolated(engine, {"messages": chat(picture(), "Hi"), "sampling": sampling}, "RequestError", needle)


# -- image size from the header --------------------------------------------------------------------

def test_decompression_bomb_header_is_an_image_error_naming_the_file(engine, tmp_path, decoded_sizes):
    # 20000x20000 = 400 M pixels, above PIL's hard limit: the header alone is refused, by name
    path = tmp_path / "bomb.png"
    path.write_bytes(png(20000, 20000, complete=False))
    check_isolated(engine, Request(chat(path, "Hi"), SamplingParams(max_new_tokens=3)),
                   "ImageError", "bomb.png", "messages[0].content[0]", "decompression bomb", "400000000 pixels")
    assert (20000, 20000) not in decoded_sizes


def test_decompression_bomb_bytes_name_their_place_in_the_messages(engine):
    data = png(20000, 20000, complete=False)
    check_isolated(engine, Request(chat("Look:", data), SamplingParams(max_new_tokens=3)),
                   "ImageError", f"image bytes ({len(data)} bytes) at messages[0].content[1]", "decompression bomb")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the test's own Image.open calls
def test_large_png_is_refused_from_its_header_without_decoding(engine, tmp_path, decoded_sizes):
    # a real, complete 12000x12000 PNG (~140 KB on disk, 144 MB decoded): refused before any pixel is read
    path = tmp_path / "huge.png"
    path.write_bytes(png(12000, 12000))
    with Image.open(path) as check:  # it is a valid image, PIL would decode it
        assert check.size == (12000, 12000)
    decoded_sizes.clear()
    check_isolated(engine, Request(chat(path, "Hi"), SamplingParams(max_new_tokens=3)),
                   "ImageError", "huge.png", "12000x12000 = 144000000 pixels exceeds max_pixels 65536")
    # also under the default max_pixels (1024 x 1024), and when the caller hands in a lazily opened PIL image
    with pytest.raises(ImageError, match="exceeds max_pixels 1048576"):
        load_image({"image": str(path)}, EngineConfig().max_pixels)
    with Image.open(path) as lazy:
        with pytest.raises(ImageError, match="image object PngImageFile at messages\\[0\\].content\\[0\\]: 12000x12000"):
            build_prompt(engine.processor, chat(lazy), MAX_PIXELS, engine.image_token_id)
    assert (12000, 12000) not in decoded_sizes  # never decoded


def test_moderately_large_image_under_the_limit_is_decoded_once(engine, tmp_path, decoded_sizes):
    path = tmp_path / "ok.png"
    path.write_bytes(png(256, 128))
    [res] = engine.generate([Request(chat(path, "Hi"), SamplingParams(max_new_tokens=2))])
    assert res.ok, res.error
    assert decoded_sizes == [(256, 128)]


# -- EXIF orientation ------------------------------------------------------------------------------

def rotated_jpeg(path, w=96, h=48):
    """A non-square JPEG stored sideways with EXIF orientation 6 (viewers turn it upright: h x w)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    picture(w, h, seed=3).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


@torch.inference_mode()
def transformers_generate(engine, image_path, text, n):
    """Plain transformers: its own image loading (``load_image``), the processor, ``model.generate``."""
    from transformers.image_utils import load_image as hf_load_image

    tmpl, _ = _template_messages(chat(image_path, text))
    prompt = engine.processor.apply_chat_template(tmpl, tokenize=False, add_generation_prompt=True)
    inputs = engine.processor(text=[prompt], images=[hf_load_image(str(image_path))], return_tensors="pt")
    out = engine.model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), inputs["image_grid_thw"][0].tolist()


def test_exif_rotated_jpeg_gives_the_same_tokens_as_plain_transformers(engine, tmp_path):
    path = rotated_jpeg(tmp_path / "sideways.jpg")
    want, want_grid = transformers_generate(engine, path, "Describe it.", 6)

    # the upright image is 48 wide, 96 high; ignoring the tag would give the transposed grid
    with Image.open(path) as raw:
        assert raw.size == (96, 48)
        ignored = engine.processor.image_processor(images=[raw.convert("RGB")], return_tensors="pt")
        ignored_grid = ignored["image_grid_thw"][0].tolist()
    assert want_grid != ignored_grid and want_grid[1:] == ignored_grid[1:][::-1]

    with Image.open(path) as as_pil:  # a path, its bytes and a PIL image opened by the caller: all upright
        requests = [Request(chat(src, "Describe it."), SamplingParams(max_new_tokens=6))
                    for src in (path, path.read_bytes(), as_pil)]
        results = engine.generate(requests)
        assert as_pil.size == (96, 48)  # the caller's image is left as it was
    for res in results:
        assert res.ok, res.error
        assert res.token_ids == want
    prompt = build_prompt(engine.processor, chat(path, "Describe it."), MAX_PIXELS, engine.image_token_id)
    assert prompt.image_grid_thw[0].tolist() == want_grid


# -- vision tokens typed as text -------------------------------------------------------------------

@pytest.mark.parametrize("messages, needle", [
    (chat("what is <|image_pad|>?"), "messages[0].content[0].text contains the vision token '<|image_pad|>'"),
    (chat(picture(), "and <|image_pad|> here"), "messages[0].content[1].text contains the vision token '<|image_pad|>'"),
    (chat("<|vision_start|>hello"), "contains the vision token '<|vision_start|>'"),
    (chat("<|vision_end|>"), "contains the vision token '<|vision_end|>'"),
    ([{"role": "system", "content": "x <|video_pad|>"}, {"role": "user", "content": "hi"}],
     "messages[0].content contains the vision token '<|video_pad|>'"),
])
def test_vision_token_typed_in_text_is_a_named_request_error(engine, messages, needle):
    # plain transformers raises ValueError for a placeholder with no image; never an AssertionError here
    error = check_isolated(engine, Request(messages, SamplingParams(max_new_tokens=3)), "RequestError", needle)
    assert "AssertionError" not in error


def test_text_that_only_resembles_a_vision_token_is_plain_text(engine):
    [res] = engine.generate([Request(chat("what is <|image|> or <image_pad>?"), SamplingParams(max_new_tokens=2))])
    assert res.ok, res.error
