"""LLaVA JSON/JSONL loading and per-sample validation (each skip reason hit by a crafted record)."""

import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import llava_json
from llava_jax.data.llava_json import Sample, Skipped, SkipReason
from llava_jax.errors import LlavaJaxError

RECORDS = [
    {"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": "Red."}]},
    {"id": 7, "conversations": [{"from": "human", "value": "Hi ünïcode"}, {"from": "gpt", "value": "Hello."}]},
    {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "Compare."},
                                                    {"from": "gpt", "value": "Same."}]},
]


def test_json_and_jsonl_load_the_same_records(tmp_path):
  (tmp_path / "d.json").write_text(json.dumps(RECORDS, indent=2, ensure_ascii=False), encoding="utf-8")
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n", encoding="utf-8")
  for name in ("d.json", "d.jsonl"):
    source = llava_json.load_llava_json(tmp_path / name)
    assert len(source) == 3
    assert [source[i] for i in range(3)] == [{"record": r, "index": i} for i, r in enumerate(RECORDS)]
  (tmp_path / "empty.json").write_text("[ ]")
  assert len(llava_json.load_llava_json(tmp_path / "empty.json")) == 0


def test_shards_cover_every_record_once(tmp_path):
  records = [{"id": str(i), "conversations": []} for i in range(11)]
  (tmp_path / "d.json").write_text(json.dumps(records))
  source = llava_json.load_llava_json(tmp_path / "d.json")
  seen = [source.shard(h, 3)[j]["record"]["id"] for h in range(3) for j in range(len(source.shard(h, 3)))]
  assert sorted(seen, key=int) == [str(i) for i in range(11)]
  assert source.shard(1, 3)[0]["index"] == 1


@pytest.mark.parametrize("text, message", [
    ("[{\"id\": 1}, ", "invalid JSON"),
    ("[{\"id\": 1},]", "invalid JSON"),
    ("[{\"id\": 1}] x", "invalid JSON"),
    ("{\"id\": 1}\n{\"id\": ", "line 2: invalid JSON"),
    ("\"just a string\"", "not LLaVA JSON"),
    ("", "not LLaVA JSON"),
])
def test_files_that_are_not_json_are_errors(tmp_path, text, message):
  (tmp_path / "bad.json").write_text(text)
  with pytest.raises(LlavaJaxError, match=message):
    llava_json.load_llava_json(tmp_path / "bad.json")


def test_missing_file_is_an_error(tmp_path):
  with pytest.raises(LlavaJaxError, match="data.json: .*nope.json: file not found"):
    llava_json.load_llava_json(tmp_path / "nope.json")


def conv(*values):
  return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def test_image_placement_and_text_only(tmp_path):
  sample = llava_json.parse_sample({"id": "x", "image": "i.png", "conversations": conv("What?", "Red.")}, 0, "/imgs")
  assert sample == Sample("x", ("/imgs/i.png",), (("human", "<image>\nWhat?"), ("gpt", "Red.")))
  written = llava_json.parse_sample({"image": ["1.png", "2.png"], "conversations": conv("A <image> B <image>", "C")}, 5, "f")
  assert written.id == "#5" and written.turns[0][1] == "A <image> B <image>" and written.images == ("f/1.png", "f/2.png")
  text_only = llava_json.parse_sample({"id": "t", "conversations": conv("Hi", "Hello", "More", "Sure")}, 0, "f")
  assert text_only.images == () and len(text_only.turns) == 4


@pytest.mark.parametrize("record, reason", [
    ({"image": "i.png", "conversations": conv("<image> and <image>", "x")}, SkipReason.IMAGE_COUNT),
    ({"conversations": conv("<image> what", "x")}, SkipReason.IMAGE_COUNT),
    ({"conversations": conv("q", "a", "q2")}, SkipReason.MALFORMED),
    ({"conversations": []}, SkipReason.MALFORMED),
    ({"conversations": "hello"}, SkipReason.MALFORMED),
    ({}, SkipReason.MALFORMED),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, SkipReason.MALFORMED),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, SkipReason.MALFORMED),
    ({"conversations": conv("q", "see <image>")}, SkipReason.MALFORMED),
    ({"image": 3, "conversations": conv("q", "a")}, SkipReason.MALFORMED),
    ([1, 2], SkipReason.MALFORMED),
])
def test_structural_skip_reasons(record, reason):
  skipped = llava_json.parse_sample(record, 3, "f")
  assert isinstance(skipped, Skipped) and skipped.reason == reason and skipped.id == "#3"
  assert skipped.detail


def test_missing_and_corrupt_images(tmp_path):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
  (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  record = {"id": "s", "image": None, "conversations": conv("<image>", "a")}
  for name, reason in (("gone.png", SkipReason.MISSING_IMAGE), ("bad.png", SkipReason.CORRUPT_IMAGE)):
    sample = llava_json.parse_sample(dict(record, image=name), 0, str(tmp_path))
    skipped = llava_json.read_images(sample)
    assert isinstance(skipped, Skipped) and skipped.reason == reason and name in skipped.detail
  ok = llava_json.read_images(llava_json.parse_sample(dict(record, image="ok.png"), 0, str(tmp_path)))
  assert [img.size for img in ok] == [(8, 8)]
  stored = llava_json.parse_sample(dict(record, image="x.png"), 0, "", image_data=[b""])
  assert llava_json.read_images(stored).reason == SkipReason.MISSING_IMAGE
