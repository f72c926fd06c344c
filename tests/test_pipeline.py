"""The grain training pipeline: batch format, skips, resume, determinism, workers, hosts, TFDS."""

import json
import logging

import jax
import numpy as np
import pytest
from PIL import Image

from llava_jax.data import images as images_lib
from llava_jax.data import pipeline as pl
from llava_jax.data.layouts import FixedLayout
from llava_jax.data.llava_json import Skipped
from llava_jax.errors import LlavaJaxError

from tokenizer_fixture import build_tiny_tokenizer

SEQ = 4        # image tokens per image
SIZE = 28      # vision input size
MAX_LEN = 160
GOOD = 24      # usable samples in the main dataset


def conv(*values):
  return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def good_records():
  records = []
  for i in range(GOOD):
    if i % 4 == 3:  # text-only, multi-turn
      records.append({"id": f"g{i}", "conversations": conv(f"Left {i}?", f"Yes {i}.", "Top?", "No.")})
    else:
      records.append({"id": f"g{i}", "image": f"img{i % 5}.png",
                      "conversations": conv("What is in the image?", f"There are {i} shapes.")})
  return records


BAD = [  # (record, the skip reason it must hit)
    ({"id": "missing", "image": "nowhere.png", "conversations": conv("<image>\nWhat?", "Red.")}, "missing_image"),
    ({"id": "corrupt", "image": "corrupt.png", "conversations": conv("<image>\nWhat?", "Red.")}, "corrupt_image"),
    ({"id": "two_tags", "image": "img0.png", "conversations": conv("<image> vs <image>", "Same.")}, "image_count_mismatch"),
    ({"id": "long", "image": "img1.png", "conversations": conv("What?", "The quick brown fox " * 30)}, "too_long"),
    ({"id": "broken", "conversations": conv("What?")}, "malformed_conversation"),
    ({"id": "two_images", "image": ["img0.png", "img1.png"], "conversations": conv("Both?", "Yes.")}, "too_many_images"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  tokenizer = build_tiny_tokenizer(root / "model")
  rng = np.random.default_rng(0)
  for i in range(5):  # odd sizes and modes exercise resize/crop and RGB conversion
    pixels = rng.integers(0, 255, (24 + 4 * i, 32, 3), np.uint8)
    Image.fromarray(pixels).convert("RGBA" if i == 4 else "RGB").save(root / f"img{i}.png")
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
  (root / "good.json").write_text(json.dumps(good_records()))
  mixed = good_records()
  for k, (record, _) in enumerate(BAD):
    mixed.insert(3 * k + 1, record)
  (root / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in mixed))
  (root / "all_bad.json").write_text(json.dumps([r for r, _ in BAD]))
  return {"root": root, "tokenizer": tokenizer, "processor": images_lib.ImageProcessor.default(SIZE)}


def make(world, json_name="good.json", batch=4, seed=0, **overrides):
  process_index = overrides.pop("process_index", 0)
  process_count = overrides.pop("process_count", 1)
  data = dict(json=str(world["root"] / json_name), image_folder=str(world["root"]), template="vicuna_v1",
              max_len=MAX_LEN, buckets=(96, 128), read_threads=2)
  data.update(overrides)
  return pl.make_pipeline(pl.DataConfig.from_config(data), world["tokenizer"], world["processor"],
                          layout=FixedLayout(SEQ), global_batch_size=batch, seed=seed,
                          process_index=process_index, process_count=process_count)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def row_keys(batch):
  """Each row's real tokens, as a hashable key identifying the sample."""
  return [tuple(ids[mask == 1]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def sample_keys(world, records):
  """What each usable record's row looks like -> its id (via the same preprocessing)."""
  pre = pl.Preprocess("vicuna_v1", world["tokenizer"], world["processor"], FixedLayout(SEQ), MAX_LEN, 1, str(world["root"]))
  out = {}
  for i, record in enumerate(records):
    example = pre.map({"record": record, "index": i})
    if not isinstance(example, Skipped):
      out[tuple(example["input_ids"])] = record["id"]
  return out


def test_batch_format(world):
  batches = take(make(world, batch=6).iterator(), 4)
  keys = sample_keys(world, good_records())
  image_id = world["tokenizer"].convert_tokens_to_ids("<image>")
  for batch in batches:
    ids, attn, loss, pix = (batch[k] for k in pl.MODEL_KEYS)
    assert ids.dtype == np.int32 and attn.dtype == np.int32 and loss.dtype == np.float32 and pix.dtype == np.float32
    assert ids.shape[0] == 6 and ids.shape[1] in (96, 128) and pix.shape == (6, 1, SIZE, SIZE, 3)
    assert batch["skipped"].shape == () and int(batch["skipped"]) == 0
    assert (loss[:, 0] == 0).all() and (loss <= attn).all()
    assert (ids[attn == 0] == world["tokenizer"].pad_token_id).all()
    for row in range(6):
      n_real = attn[row].sum()
      assert (attn[row, :n_real] == 1).all()  # right padded
      n_images = (ids[row] == image_id).sum() // SEQ
      assert (ids[row] == image_id).sum() == n_images * SEQ
      assert not loss[row][ids[row] == image_id].any()
      assert np.abs(pix[row, 0]).sum() > 0 if n_images else not pix[row].any()
      assert tuple(ids[row, :n_real]) in keys


def test_several_images_per_sample(world):
  pipeline = make(world, "mixed.jsonl", batch=4, max_images=2, shuffle=False)
  batches = take(pipeline.iterator(), (GOOD + 1) // 4)
  image_id = world["tokenizer"].convert_tokens_to_ids("<image>")
  per_row = [((b["input_ids"] == image_id).sum(1) // SEQ, b["pixel_values"]) for b in batches]
  counts = np.concatenate([c for c, _ in per_row])
  assert sorted(set(counts.tolist())) == [0, 1, 2] and (counts == 2).sum() == 1
  for c, pix in per_row:
    for row, n in enumerate(c):
      assert all(pix[row, k].any() == (k < n) for k in range(2))
  assert int(batches[-1]["skipped"]) == len(BAD) - 1


def test_skip_reasons_counted_and_logged(world, caplog):
  pipeline = make(world, "mixed.jsonl", batch=4)
  assert pipeline.records == GOOD + len(BAD)
  with caplog.at_level(logging.WARNING, logger="llava_jax.data"):
    batches = take(pipeline.iterator(), GOOD // 4)  # exactly one epoch of good samples
  seen = [key for batch in batches for key in row_keys(batch)]
  assert sorted(sample_keys(world, good_records()).get(k) for k in seen) == sorted(r["id"] for r in good_records())
  assert int(batches[-1]["skipped"]) == len(BAD)
  for record, reason in BAD:
    assert any(record["id"] in m and reason in m for m in caplog.messages), (record["id"], reason)


def test_dataset_with_nothing_usable_is_an_error(world):
  with pytest.raises(LlavaJaxError, match="no usable sample"):
    next(make(world, "all_bad.json", batch=2).iterator())


def test_resume_continues_exactly(world):
  uninterrupted = take(make(world, "mixed.jsonl", batch=4, seed=3).iterator(), 12)
  it = make(world, "mixed.jsonl", batch=4, seed=3).iterator()
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  resumed = make(world, "mixed.jsonl", batch=4, seed=3).iterator(state)
  assert_same(take(resumed, 7), uninterrupted[5:])


def test_shuffle_is_seeded_and_reshuffles_each_epoch(world):
  epoch = GOOD // 4
  a = take(make(world, seed=1).iterator(), 2 * epoch)
  assert_same(a, take(make(world, seed=1).iterator(), 2 * epoch))
  b = take(make(world, seed=2).iterator(), epoch)
  assert any(ka != kb for x, y in zip(a, b) for ka, kb in zip(row_keys(x), row_keys(y)))
  first = [k for batch in a[:epoch] for k in row_keys(batch)]
  second = [k for batch in a[epoch:] for k in row_keys(batch)]
  assert sorted(first) == sorted(second) == sorted(sample_keys(world, good_records()))
  assert first != second


def test_two_workers_give_the_batches_of_zero_workers(world):
  expected = take(make(world, "mixed.jsonl", batch=4, seed=5).iterator(), 8)
  it = make(world, "mixed.jsonl", batch=4, seed=5, num_workers=2).iterator()
  try:  # one set of worker processes (spawning is the slow part): run, then rewind by state
    got = take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    got += take(it, 4)
    assert_same(got, expected)
    it.set_state(state)
    assert_same(take(it, 4), expected[4:])
  finally:
    it.close()


def test_two_hosts_cover_the_data_once_per_epoch(world):
  hosts = [make(world, batch=8, seed=9, process_index=h, process_count=2) for h in range(2)]
  assert [h.local_batch_size for h in hosts] == [4, 4] and [h.records for h in hosts] == [12, 12]
  keys = [[k for b in take(h.iterator(), h.steps_per_epoch) for k in row_keys(b)] for h in hosts]
  assert not set(keys[0]) & set(keys[1])
  assert sorted(keys[0] + keys[1]) == sorted(sample_keys(world, good_records()))


def test_global_batch_on_a_mesh(world):
  batch = next(make(world, batch=8).iterator())
  mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  arrays = pl.make_global_batch(batch, mesh, pad_id=0)
  assert set(arrays) == set(pl.MODEL_KEYS)
  for key in pl.MODEL_KEYS:
    assert arrays[key].shape == batch[key].shape
    np.testing.assert_array_equal(np.asarray(arrays[key]), batch[key])
    assert arrays[key].sharding.spec[0] == ("data", "fsdp")
  # Hosts that picked a shorter bucket pad to the length all hosts agreed on.
  extra = 32
  padded = pl.make_global_batch(batch, mesh, pad_id=7, length=batch["input_ids"].shape[1] + extra)
  for key, fill in (("input_ids", 7), ("attention_mask", 0), ("loss_mask", 0)):
    expected = np.pad(batch[key], ((0, 0), (0, extra)), constant_values=fill)
    np.testing.assert_array_equal(np.asarray(padded[key]), expected)
  np.testing.assert_array_equal(np.asarray(padded["pixel_values"]), batch["pixel_values"])


@pytest.mark.parametrize("aspect_ratio,pads", [("pad", True), ("square", False)])
def test_image_aspect_ratio_sets_the_pipelines_processor(world, aspect_ratio, pads):
  pipe = make(world, image_aspect_ratio=aspect_ratio)
  assert pipe.image_processor.pad_to_square == pads
  assert make(world).image_processor == world["processor"]  # "" keeps the model folder's


def test_tfds_round_trip_and_same_batches(world, tmp_path):
  from llava_jax.data import llava_json, tfds_builder  # imports tensorflow_datasets (pinned: missing fails)
  json_path = str(world["root"] / "mixed.jsonl")
  data_dir = tfds_builder.build(json_path, str(world["root"]), str(tmp_path / "tfds"))
  source = tfds_builder.open_source(data_dir)
  records = llava_json.load_llava_json(json_path)
  assert len(source) == len(records)
  for i in range(len(records)):
    stored, original = tfds_builder.decode_record(source[i]), records[i]
    assert stored["record"] == original["record"] and stored["index"] == original["index"]
    names = llava_json.image_names(original["record"]) or []
    files = [(world["root"] / n) for n in names]
    assert stored["images"] == [f.read_bytes() if f.exists() else b"" for f in files]
  from_json = take(make(world, "mixed.jsonl", batch=4, seed=4).iterator(), 7)
  from_tfds = take(make(world, "mixed.jsonl", batch=4, seed=4, source="tfds", tfds_dir=data_dir).iterator(), 7)
  assert_same(from_tfds, from_json)


def test_config_errors(world):
  with pytest.raises(LlavaJaxError, match="data.template"):
    pl.DataConfig.from_config({"json": "x.json", "template": "alpaca"})
  with pytest.raises(LlavaJaxError, match="data.json"):
    pl.DataConfig.from_config({})
  with pytest.raises(LlavaJaxError, match="not divisible"):
    make(world, batch=5, process_count=2)
  assert pl.default_buckets(2048) == (512, 1024, 2048)
  assert pl.resolve_buckets((64, 5000), 100) == (64, 100)
