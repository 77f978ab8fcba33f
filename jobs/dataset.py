"""Input datasets of the batch job: JSONL or Parquet rows -> validated chat items.

A row has an ``id`` and either ``messages`` (the engine's chat format: a list of
``{"role": ..., "content": str | [{"type": "text", "text": ...}, {"type": "image", "image": PATH}]}``)
or ``prompt`` + ``images`` (a list of paths, or one path). Image paths are resolved relative to the
input file, checked (exists, size, decodes, pixel count) and read into bytes here, on the driver: workers
on other nodes cannot see the driver's files, and bytes travel through the object store.

A bad row never stops the job: it becomes an ``Item`` with ``error`` set, and the job writes that error
into the row's output. Only dataset-level problems (unreadable file, unknown format, duplicate ids) raise.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FORMATS = (".jsonl", ".json", ".parquet")


@dataclass(slots=True)
class Item:
    """One row, ready for a runner: ``messages`` with images as bytes, or ``error`` saying what is wrong."""

    id: str
    messages: list[dict] | None = None
    error: str | None = None
    image_bytes: int = field(default=0, repr=False)


class DatasetError(ValueError):
    """The dataset as a whole cannot be read (not a single bad row)."""


@dataclass(frozen=True)
class Limits:
    """Per-row limits. ``max_pixels``: width x height of one image; ``max_image_bytes``: file size."""

    max_pixels: int = 1024 * 1024
    max_image_bytes: int = 32 << 20


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Raw rows of a .jsonl/.json (one object per line) or .parquet file, in file order."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"input {str(p)!r} is not a file")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DatasetError(f"cannot read Parquet input {str(p)!r}: {e}") from e
    if suffix in (".jsonl", ".json"):
        rows = []
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    # A broken line is a bad row, not a broken dataset: keep it so it gets its error.
                    row = {"__error__": f"line {lineno} is not valid JSON: {e.msg}"}
                if not isinstance(row, dict):
                    row = {"__error__": f"line {lineno} is a JSON {type(row).__name__}, expected an object"}
                row.setdefault("__line__", lineno)
                rows.append(row)
        return rows
    raise DatasetError(f"input {str(p)!r}: unknown format {suffix!r}; allowed: {', '.join(FORMATS)}")


def row_id(row: dict, index: int) -> str:
    """The row's id as a string; a row without one is named by its position so its error can be reported."""
    rid = row.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        where = f"line {row['__line__']}" if "__line__" in row else f"row {index}"
        return f"<missing id: {where}>"
    if isinstance(rid, float) and rid.is_integer():
        rid = int(rid)
    return str(rid)


def load(path: str | os.PathLike, limits: Limits = Limits(), skip: set[str] | frozenset = frozenset()) -> Iterator[Item]:
    """Validated items of the dataset at ``path``, in order, leaving out ids in ``skip``.

    Images are read lazily, one item at a time, so a large dataset never sits in memory as bytes.
    Raises ``DatasetError`` for duplicate ids (the output is keyed by id).
    """
    rows = read_rows(path)
    base = Path(path).resolve().parent
    ids = [row_id(r, i) for i, r in enumerate(rows)]
    seen: dict[str, int] = {}
    for i, rid in enumerate(ids):
        if rid in seen:
            raise DatasetError(f"duplicate id {rid!r} (rows {seen[rid]} and {i}); ids must be unique")
        seen[rid] = i
    for rid, row in zip(ids, rows):
        if rid in skip:
            continue
        yield to_item(rid, row, base, limits)


def ids_in_order(path: str | os.PathLike) -> list[str]:
    return [row_id(r, i) for i, r in enumerate(read_rows(path))]


def to_item(rid: str, row: dict, base: Path, limits: Limits) -> Item:
    """One row -> an ``Item``; every problem becomes the item's error, never an exception."""
    try:
        if "__error__" in row:
            raise RowError(row["__error__"])
        if rid.startswith("<missing id"):
            raise RowError("row has no 'id'")
        messages = _messages(row)
        total = 0
        for msg in messages:
            if isinstance(msg["content"], list):
                for part in msg["content"]:
                    if part["type"] == "image":
                        part["image"] = read_image(part["image"], base, limits)
                        total += len(part["image"])
        return Item(rid, messages, None, total)
    except RowError as e:
        return Item(rid, None, str(e))


class RowError(ValueError):
    """What is wrong with one row; becomes the row's ``error``."""


def _messages(row: dict) -> list[dict]:
    has_messages = row.get("messages") is not None
    has_prompt = row.get("prompt") is not None
    if has_messages and has_prompt:
        raise RowError("row has both 'messages' and 'prompt'; give one of them")
    if has_messages:
        return _check_messages(row["messages"])
    if has_prompt:
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise RowError(f"'prompt' must be a non-empty string, got {_short(prompt)}")
        images = row.get("images") or []
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
            raise RowError(f"'images' must be a list of file paths, got {_short(images)}")
        content = [{"type": "image", "image": x} for x in images] + [{"type": "text", "text": prompt}]
        return [{"role": "user", "content": content}]
    raise RowError("row needs 'messages' or 'prompt' (+ optional 'images')")


def _check_messages(messages: Any) -> list[dict]:
    if isinstance(messages, str):  # Parquet/CSV producers often store the chat as a JSON string
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise RowError(f"'messages' is a string but not JSON: {e.msg}") from None
    if not isinstance(messages, list) or not messages:
        raise RowError(f"'messages' must be a non-empty list of {{role, content}} objects, got {_short(messages)}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RowError(f"messages[{i}] must be an object, got {_short(msg)}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise RowError(f"messages[{i}].role is {_short(role)}; allowed: {', '.join(ROLES)}")
        if isinstance(content, str):
            if not content:
                raise RowError(f"messages[{i}].content is empty")
            out.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list) or not content:
            raise RowError(f"messages[{i}].content must be a string or a non-empty list of parts, got {_short(content)}")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image" and isinstance(part.get("image"), str) and part["image"]:
                if role != "user":
                    raise RowError(f"messages[{i}].content[{j}]: images are only allowed in user messages")
                parts.append({"type": "image", "image": part["image"]})
            else:
                raise RowError(f"messages[{i}].content[{j}] must be {{type: text, text: str}} or "
                               f"{{type: image, image: path}}, got {_short(part)}")
        out.append({"role": role, "content": parts})
    if out[-1]["role"] == "assistant":
        raise RowError("the last message is from the assistant; nothing to answer")
    return out


def read_image(ref: str, base: Path, limits: Limits) -> bytes:
    """Bytes of the image file ``ref`` (relative to ``base``) after checking size, format and pixel count."""
    from PIL import Image, UnidentifiedImageError

    if "://" in ref:
        raise RowError(f"image {ref!r}: only local file paths are supported (no URLs)")
    p = Path(ref) if os.path.isabs(ref) else base / ref
    if not p.is_file():
        raise RowError(f"image {ref!r} not found (looked at {str(p)!r})")
    size = p.stat().st_size
    if size > limits.max_image_bytes:
        raise RowError(f"image {ref!r} is {size} bytes; the limit is {limits.max_image_bytes} (max_image_bytes)")
    data = p.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > limits.max_pixels:
                raise RowError(f"image {ref!r} is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels} (max_pixels)")
            im.load()  # decodes every pixel: a truncated file fails here, not later on a worker
    except RowError:
        raise
    except Image.DecompressionBombError as e:  # refused by PIL from the header, before any pixel is decoded
        raise RowError(f"image {ref!r} is refused as a decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RowError(f"image {ref!r} is corrupt or not an image: {e}") from None
    return data


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
