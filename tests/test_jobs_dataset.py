"""jobs.dataset: rows -> validated items; a bad row carries its error, the dataset goes on."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.dataset import DatasetError, Limits, ids_in_order, load


@pytest.fixture
def imgdir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(d / "ok.png")
    Image.new("RGB", (300, 300), (1, 2, 3)).save(d / "big.png")
    good = (d / "ok.png").read_bytes()
    (d / "cut.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    (d / "text.png").write_bytes(b"not an image at all")
    return d


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_and_images_become_messages_with_bytes(tmp_path, imgdir):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi", "images": ["imgs/ok.png"]}])
    [item] = list(load(src))
    assert item.id == "1" and item.error is None
    parts = item.messages[0]["content"]
    assert parts[0]["type"] == "image" and parts[0]["image"] == (imgdir / "ok.png").read_bytes()
    assert parts[1] == {"type": "text", "text": "hi"}


def test_bad_rows_get_errors_naming_the_problem(tmp_path, imgdir):
    rows = [
        {"id": "missing", "prompt": "x", "images": ["imgs/nope.png"]},
        {"id": "cut", "prompt": "x", "images": ["imgs/cut.png"]},
        {"id": "text", "prompt": "x", "images": ["imgs/text.png"]},
        {"id": "big", "prompt": "x", "images": ["imgs/big.png"]},
        {"id": "empty", "messages": []},
        {"id": "role", "messages": [{"role": "robot", "content": "x"}]},
        {"id": "part", "messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}]},
        {"id": "neither"},
        "{not json",
        {"prompt": "no id"},
        {"id": "url", "prompt": "x", "images": ["http://example.com/a.png"]},
        {"id": "good", "messages": [{"role": "user", "content": "fine"}]},
    ]
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    items = {i.id: i for i in load(src, Limits(max_pixels=200 * 200))}
    assert "not found" in items["missing"].error
    assert "corrupt" in items["cut"].error and "corrupt" in items["text"].error
    assert "90000 pixels" in items["big"].error and "max_pixels" in items["big"].error
    assert "non-empty list" in items["empty"].error
    assert "robot" in items["role"].error
    assert "content[0]" in items["part"].error
    assert "needs 'messages' or 'prompt'" in items["neither"].error
    assert "not valid JSON" in items["<missing id: line 9>"].error
    assert "no 'id'" in items["<missing id: line 10>"].error
    assert "URLs" in items["url"].error
    assert items["good"].error is None
    assert items["good"].messages == [{"role": "user", "content": [{"type": "text", "text": "fine"}]}]


def test_file_size_limit(tmp_path, imgdir):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x", "images": "imgs/ok.png"}])
    [item] = list(load(src, Limits(max_image_bytes=10)))
    assert "max_image_bytes" in item.error


def test_parquet_input_with_messages_as_json_string(tmp_path, imgdir):
    msgs = json.dumps([{"role": "user", "content": [{"type": "image", "image": "imgs/ok.png"},
                                                    {"type": "text", "text": "q"}]}])
    pq.write_table(pa.table({"id": ["a", "b"], "messages": [msgs, None], "prompt": [None, "p"]}), tmp_path / "in.parquet")
    items = list(load(tmp_path / "in.parquet"))
    assert [i.id for i in items] == ["a", "b"] and all(i.error is None for i in items)
    assert isinstance(items[0].messages[0]["content"][0]["image"], bytes)


def test_skip_and_order(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "x"} for i in range(5)])
    assert ids_in_order(src) == ["0", "1", "2", "3", "4"]
    assert [i.id for i in load(src, skip={"1", "3"})] == ["0", "2", "4"]


def test_duplicate_ids_and_unknown_format_are_dataset_errors(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    with pytest.raises(DatasetError, match="duplicate id 'a'"):
        list(load(src))
    (tmp_path / "in.csv").write_text("id\n1\n")
    with pytest.raises(DatasetError, match="unknown format '.csv'"):
        list(load(tmp_path / "in.csv"))


def test_parquet_input_with_nested_messages(tmp_path, imgdir):
    # a list<struct<role, content: list<struct<type, text, image>>>> column, as pyarrow writes dicts
    msgs = [{"role": "system", "content": [{"type": "text", "text": "be brief", "image": None}]},
            {"role": "user", "content": [{"type": "image", "text": None, "image": "imgs/ok.png"},
                                         {"type": "text", "text": "what is it?", "image": None}]}]
    pq.write_table(pa.Table.from_pylist([{"id": "n1", "messages": msgs}]), tmp_path / "in.parquet")
    [item] = list(load(tmp_path / "in.parquet"))
    assert item.error is None
    assert item.messages[1]["content"][0]["image"] == (imgdir / "ok.png").read_bytes()
    assert item.messages[1]["content"][1] == {"type": "text", "text": "what is it?"}


def test_a_decompression_bomb_header_is_the_rows_error(tmp_path, imgdir):
    from tests.test_engine_inputs import png

    (imgdir / "bomb.png").write_bytes(png(20000, 20000, complete=False))  # header only: nothing big is allocated
    src = _write_jsonl(tmp_path / "in.jsonl", [{"id": "bomb", "prompt": "x", "images": ["imgs/bomb.png"]},
                                               {"id": "ok", "prompt": "x", "images": ["imgs/ok.png"]}])
    items = {i.id: i for i in load(src)}
    assert "imgs/bomb.png" in items["bomb"].error and "decompression bomb" in items["bomb"].error
    assert items["ok"].error is None
