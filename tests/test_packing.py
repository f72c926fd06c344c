"""`data.packing`: first-fit rows against a hand computation, packed batches against the same samples unpacked
(loss, gradients and each sample's logits, LLaVA-1.5 and NeXT AnyRes images), bad samples and resume in the
pipeline, and SIGKILL + rerun of a packed run against an uninterrupted one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures as F
from hf_fixtures import hf_state, next_image_processor, our_config, tiny_hf_model, tiny_hf_next_model
from llava_jax.data import images as images_lib
from llava_jax.data import packing
from llava_jax.data import pipeline as pl
from llava_jax.data.layouts import layout_for
from llava_jax.data.processor import load_tokenizer
from llava_jax.models.llava import Llava
from llava_jax.train import trainer
from llava_jax.weights.mapping import hf_to_params
from test_train_next import SIZES, _image, _record
from test_train_processes import assert_sigkill_then_rerun_equals_uninterrupted, train_command
from test_train_run import TEXT_ONLY, bad_records


def _sample(tokens, tiles, feature_index=None, first=0):
  """A preprocessed sample: ids first, first + 1, ...; loss on all but its first token; tile t filled with first + t."""
  sample = {"input_ids": np.arange(first, first + tokens, dtype=np.int32),
            "loss_mask": np.r_[0.0, np.ones(tokens - 1)].astype(np.float32),
            "pixel_values": np.stack([np.full((2, 2, 3), first + t, np.float32) for t in range(tiles)]
                                     or [np.zeros((2, 2, 3), np.float32)])[:tiles]}
  if feature_index is not None:
    sample[packing.FEATURE_INDEX] = np.asarray(feature_index, np.int32)
  return sample


def test_first_fit_places_each_sample_in_the_first_row_with_room():
  # (tokens, tiles) against 2 rows of 10 tokens and 2 tiles, worked by hand:
  # s0 -> row 0 (6, 1); s1: 6 + 5 > 10 -> row 1 (5, 1); s2 -> row 0 (9, 1); s3: 9 + 4 > 10 -> row 1 (9, 2);
  # s4 -> row 0 (10, 2); s5: row 0 full -> row 1 (10, 2); then no row has room for anything.
  rows = packing.FirstFitRows(2, max_tokens=10, max_tiles=2)
  samples = [_sample(t, m, first=100 * i) for i, (t, m) in enumerate([(6, 1), (5, 1), (3, 0), (4, 1), (1, 1), (1, 0)])]
  assert [rows.place(s) for s in samples] == [True] * 6
  assert [[int(s["input_ids"][0]) // 100 for s in row] for row in rows.rows] == [[0, 2, 4], [1, 3, 5]]
  assert rows.full() and not rows.place(_sample(1, 0))
  # Tiles alone turn a sample away: row 0 has the tokens but not the tile.
  rows = packing.FirstFitRows(2, max_tokens=10, max_tiles=1)
  assert rows.place(_sample(2, 1)) and rows.place(_sample(2, 1, first=7)) and not rows.place(_sample(1, 1))
  assert [len(r) for r in rows.rows] == [1, 1] and not rows.full()
  # One sample per row (unpacked): full once every row has one, however short.
  rows = packing.FirstFitRows(2, max_tokens=10, max_tiles=2, samples_per_row=1)
  assert rows.place(_sample(1, 0)) and not rows.full() and rows.place(_sample(1, 0)) and rows.full()


def test_pack_row_concatenates_samples_with_segment_ids_and_shifted_feature_index():
  tokens_per_tile = 4
  a = _sample(4, 2, feature_index=[0, 5, -1, 7], first=10)  # 2 tiles: features 0..7
  b = _sample(3, 0, feature_index=[], first=20)              # text only
  c = _sample(3, 1, feature_index=[2, -1, 3], first=30)      # 1 tile, after a's 2
  row = packing.pack_row([a, b, c], tokens_per_tile)
  np.testing.assert_array_equal(row["input_ids"], [10, 11, 12, 13, 20, 21, 22, 30, 31, 32])
  np.testing.assert_array_equal(row["attention_mask"], [1, 1, 1, 1, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 1, 0, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(row[packing.FEATURE_INDEX], [0, 5, -1, 7, 2 + 8, -1, 3 + 8])
  np.testing.assert_array_equal(row["pixel_values"][:, 0, 0, 0], [10, 11, 30])
  one = packing.pack_row([_sample(4, 1, first=10)], tokens_per_tile)  # an unpacked row of the fixed layout
  assert packing.FEATURE_INDEX not in one and (one["attention_mask"] == 1).all()


def test_pack_row_shifts_every_tap_of_a_feature_mix_and_keeps_its_weights():
  """OneVision's blended features: index (K, taps) and weights; the second sample's taps move past the first's
  tiles, newline taps stay -1, weights travel unchanged."""
  a = _sample(2, 2, feature_index=[[0, 1, 4, 5], [-1, -1, -1, -1]])
  b = _sample(2, 1, feature_index=[[3, 0, 0, 0], [1, 2, -1, -1]])
  a[packing.FEATURE_WEIGHTS] = np.array([[.25, .25, .25, .25], [1, 0, 0, 0]], np.float32)
  b[packing.FEATURE_WEIGHTS] = np.array([[1, 0, 0, 0], [.5, .5, 0, 0]], np.float32)
  row = packing.pack_row([a, b], tokens_per_tile=4)
  np.testing.assert_array_equal(row[packing.FEATURE_INDEX], [[0, 1, 4, 5], [-1, -1, -1, -1],
                                                             [11, 8, 8, 8], [9, 10, -1, -1]])
  np.testing.assert_array_equal(row[packing.FEATURE_WEIGHTS], np.concatenate([a[packing.FEATURE_WEIGHTS],
                                                                              b[packing.FEATURE_WEIGHTS]]))


# ---------------------------------------------------------------- pipelines of the tiny worlds

def _records_fixed():
  """Captions (16 image tokens each) and text-only questions of several lengths."""
  questions = ["What is in the image?", "Describe it briefly.", "What is in the image? Describe it briefly."]
  text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "A red star."}]}
          for i, q in enumerate(questions)]
  captions = F.caption_records(9)
  return [r for pair in zip(captions[::3], captions[1::3], captions[2::3], text) for r in pair]


@pytest.fixture(scope="module")
def fixed_world(tmp_path_factory):
  root = tmp_path_factory.mktemp("pack_fixed")
  world = F.make_world(root, _records_fixed())
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
  (root / "mixed.json").write_text(json.dumps(bad_records() + [TEXT_ONLY] + _records_fixed()))
  return dict(world, mixed=str(root / "mixed.json"), config=our_config(tiny_hf_model()),
              image_processor=images_lib.ImageProcessor.from_folder(world["tokenizer"], image_size=28))


@pytest.fixture(scope="module")
def next_world(tmp_path_factory):
  root = tmp_path_factory.mktemp("pack_next")
  world = F.make_world(root)
  next_image_processor().save_pretrained(world["tokenizer"])
  for k, size in enumerate(SIZES):
    _image(size, k).save(root / f"s{k}.png")
  text = {"id": "text", "conversations": [{"from": "human", "value": "Describe it briefly."},
                                          {"from": "gpt", "value": "A blue square."}]}
  records = [_record(0, ["s0.png"], "A red star."), text, _record(2, ["s1.png"], "A blue circle."),
             _record(3, ["s2.png", "s3.png"], "A green square."), _record(4, ["s5.png"], "A yellow star."),
             _record(5, ["s4.png"], "A red circle."), text]
  (root / "packed.json").write_text(json.dumps(records))
  return dict(world, json=str(root / "packed.json"), config=our_config(tiny_hf_next_model(seed=3)),
              image_processor=images_lib.ImageProcessor.from_folder(world["tokenizer"]))


def make(world, batch, packing_on, json_path=None, **data):
  values = dict(json=json_path or world["json"], image_folder=world["images"], template="vicuna_v1", shuffle=False,
                packing=packing_on)
  values.update(data)
  return pl.make_pipeline(pl.DataConfig.from_config(values), load_tokenizer(world["tokenizer"]),
                          world["image_processor"], layout=layout_for(world["config"]), global_batch_size=batch,
                          seed=0, process_index=0, process_count=1)


FIXED_DATA = dict(max_len=64, buckets=(32,), template="plain")
NEXT_DATA = dict(max_len=256, buckets=(128,), max_images=2, max_tiles=12, template="plain")


def packed_and_unpacked(world, data):
  """The first packed batch (2 rows) and the same samples unpacked, one per row."""
  packed = next(make(world, 2, True, **data).iterator())
  samples = int(sum(row.max() for row in packed["attention_mask"]))
  return packed, next(make(world, samples, False, **data).iterator())


def segments(batch):
  """(row, slots) of each sample of a batch, row by row."""
  return [(r, np.flatnonzero(ids == k)) for r, ids in enumerate(batch["attention_mask"]) for k in range(1, ids.max() + 1)]


def matching_rows(packed, unpacked):
  """For each packed segment, the unpacked row holding the same sample (same tokens and loss mask)."""
  free, out = list(range(len(unpacked["input_ids"]))), []
  for row, slots in segments(packed):
    same = lambda j: (np.array_equal(unpacked["input_ids"][j, :len(slots)], packed["input_ids"][row, slots])
                      and unpacked["attention_mask"][j].sum() == len(slots)
                      and np.array_equal(unpacked["loss_mask"][j, :len(slots)], packed["loss_mask"][row, slots]))
    out.append(next(j for j in free if same(j)))
    free.remove(out[-1])
  return out


def loss_and_grads(model, params, batch):
  """The train step's loss (and logits), and its gradients w.r.t. every parameter; the batch is traced, as the
  step's is (the model checks a fixed-layout row's tiles against its image tokens only on concrete inputs)."""
  def loss(p, b):
    logits, _ = model.apply({"params": p}, b["input_ids"], b["pixel_values"], b["attention_mask"],
                            image_feature_index=b.get(pl.FEATURE_INDEX))
    total, count = trainer.masked_ce_sum(logits, b["input_ids"], b["loss_mask"])
    return total / count, logits
  model_batch = {k: v for k, v in batch.items() if k != "skipped"}
  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, model_batch)
  return float(value), np.asarray(logits), grads


@pytest.mark.parametrize("world_name,data", [("fixed_world", FIXED_DATA), ("next_world", NEXT_DATA)])
def test_packed_batch_trains_as_its_samples_unpacked(request, world_name, data):
  """Loss and gradients of a packed batch equal those of its samples one per row (1e-5, float32), and each
  sample's logits in the packed row equal its logits alone; image samples sit after others in a row, so their
  features only land right when each sample's tiles and feature index are offset."""
  world = request.getfixturevalue(world_name)
  config = world["config"]
  hf = tiny_hf_model() if world_name == "fixed_world" else tiny_hf_next_model(seed=3)
  params = jax.tree.map(jnp.asarray, hf_to_params(hf_state(hf).__getitem__, config))
  packed, unpacked = packed_and_unpacked(world, data)
  rows = matching_rows(packed, unpacked)
  assert len(rows) > 2 * len(packed["input_ids"]) - 1  # more samples than rows
  image_token = config.image_token_index
  later_images = [(r, s) for r, s in segments(packed) if s[0] > 0 and (packed["input_ids"][r, s] == image_token).any()]
  assert later_images, "no image sample after another in a row: offsets untested"
  assert (packed["attention_mask"] > 0).sum() == unpacked["attention_mask"].sum()

  model = Llava(config)
  loss_p, logits_p, grads_p = loss_and_grads(model, params, packed)
  loss_u, logits_u, grads_u = loss_and_grads(model, params, unpacked)
  assert abs(loss_p - loss_u) <= 1e-5 * abs(loss_u), (loss_p, loss_u)
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(grads_p)[0], jax.tree.leaves(grads_u)):
    got, want, name = np.asarray(got), np.asarray(want), jax.tree_util.keystr(path, simple=True, separator="/")
    # Softmax ignores the key bias (one constant added to all of a query's scores): its gradient is rounding noise.
    bound = 1e-8 if name.endswith("k_proj/bias") else 1e-5 * np.abs(want).max()
    assert np.abs(got - want).max() <= bound, name
  for (row, slots), j in zip(segments(packed), rows):
    np.testing.assert_allclose(logits_p[row, slots], logits_u[j, :len(slots)], rtol=1e-5, atol=1e-5)


def test_packed_pipeline_keeps_order_skips_as_unpacked_and_resumes_exactly(fixed_world):
  """Each batch holds the next samples in pipeline order and ends at the first one that fits in none of its rows;
  bad samples (one too long for a row) are the unpacked pipeline's counted skips; resuming from a saved state
  (which rewinds to the sample read ahead) gives the same batches."""
  data = dict(FIXED_DATA, json=fixed_world["mixed"])
  unpacked = make(fixed_world, 1, False, **data).iterator()
  order = [next(unpacked)]  # one sample per batch: the samples in pipeline order
  skips = {"missing_image": 1, "corrupt_image": 1, "image_count_mismatch": 1, "too_long": 1}  # the bad records
  assert dict(unpacked.skip_counts) == skips
  order += [next(unpacked) for _ in range(40)]
  has_image = lambda ids: bool((ids == fixed_world["config"].image_token_index).any())
  max_tiles = FIXED_DATA["max_len"] // fixed_world["config"].tokens_per_tile  # packing's default data.max_tiles
  packed = make(fixed_world, 2, True, **data).iterator()
  batches, states, seen = [], [], 0
  for _ in range(4):
    batch = next(packed)
    batches.append(batch)
    states.append((packed.get_state(), packed.pending is not None))
    if len(batches) == 1:
      assert dict(packed.skip_counts) == skips
    got = sorted(tuple(batch["input_ids"][r, s]) for r, s in segments(batch))
    count = len(got)
    want = sorted(tuple(b["input_ids"][0, b["attention_mask"][0] > 0]) for b in order[seen:seen + count])
    assert got == want
    seen += count
    tokens, tiles = np.zeros(2, int), np.zeros(2, int)
    for r, s in segments(batch):
      tokens[r] += len(s)
      tiles[r] += has_image(batch["input_ids"][r, s])
    upcoming = order[seen]["input_ids"][0, order[seen]["attention_mask"][0] > 0]
    assert ((tokens + len(upcoming) > FIXED_DATA["max_len"]) | (tiles + has_image(upcoming) > max_tiles)).all()
  assert all(pending for _, pending in states)  # every saved state rewinds to a sample read ahead
  resumed = make(fixed_world, 2, True, **data).iterator(states[1][0])
  for want in batches[2:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_sigkill_then_rerun_with_packing_equals_uninterrupted(fixed_world, tmp_path):
  """Killed after a checkpoint whose data position rewinds to a sample read ahead, then rerun: the same run."""
  packed = {"data.packing": True, "data.max_len": 64, "data.buckets": "(32,)", "total_steps": 4, "batch_size": 2}
  assert_sigkill_then_rerun_equals_uninterrupted(lambda workdir: train_command(fixed_world, workdir, **packed),
                                                 tmp_path)
  assert all(0.6 < r["packing_efficiency"] <= 1 for r in F.read_metrics(tmp_path / "reference"))
