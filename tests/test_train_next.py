"""Training LLaVA-NeXT (configs/llava_next.py): AnyRes rows with their own tiles, image-token counts and feature
index in one batch, the loss against transformers' LlavaNextForConditionalGeneration, per-parameter learning
rates, both stages on the tiny NeXT model, and SIGKILL + rerun against an uninterrupted run."""

import json
import os
import re
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

import train_fixtures as F
from hf_fixtures import hf_state, next_image_processor, our_config, tiny_hf_next_model
from llava_jax.data import images as images_lib
from llava_jax.data import pipeline as pl
from llava_jax.data.layouts import images_feature_index, layout_for
from llava_jax.errors import LlavaJaxError
from llava_jax.models.llava import Llava, abstract_params
from llava_jax.train import main as train_main
from llava_jax.train import optim, trainer
from llava_jax.weights.mapping import hf_to_params
from test_train_processes import ONE_DEVICE, assert_params_close, assert_sigkill_then_rerun_equals_uninterrupted
from test_train_processes import finish, read_logs, start, two_processes

NEXT_CONFIG = os.path.join(F.REPO, "configs", "llava_next.py")
# (height, width): square, wide, tall, and sizes whose unpadding crops rows or columns of the tile grid.
SIZES = [(28, 28), (30, 80), (90, 25), (40, 40), (20, 60), (70, 50)]
SMALL = (5, 40)  # smaller than one 7x7 patch
MAX_LEN = 320


def _image(size, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
  return Image.fromarray(pixels)


def _record(i, names, caption):
  return {"id": f"r{i}", "image": names, "conversations": [{"from": "human", "value": "<image>\n" * len(names)},
                                                           {"from": "gpt", "value": caption}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Tokenizer + LLaVA-NeXT image processor files, images of every SIZE, caption records (one with a wide and a
  tall image), and a file that adds an image smaller than a patch and a row over data.max_tiles."""
  root = tmp_path_factory.mktemp("next_world")
  base = F.make_world(root)
  next_image_processor().save_pretrained(base["tokenizer"])  # the pipeline's AnyRes preprocessing
  for k, size in enumerate(SIZES + [SMALL]):
    _image(size, k).save(root / f"s{k}.png")
  good = [_record(i, [f"s{i % len(SIZES)}.png"], f"A {c} {s}.")
          for i, (c, s) in enumerate(zip(list(F.COLORS) * 3, F.SHAPES * 3))][:11]
  good.append(_record(11, ["s1.png", "s2.png"], "A red star."))  # 3 + 3 tiles
  bad = [_record(12, [f"s{len(SIZES)}.png"], "A red star."),  # corrupt_image: smaller than a patch
         _record(13, ["s3.png", "s3.png"], "A blue star.")]   # too_many_images: 2 x 5 tiles > data.max_tiles 8
  (root / "good.json").write_text(json.dumps(good))
  (root / "mixed.json").write_text(json.dumps(good[:6] + bad + good[6:]))
  return dict(base, json=str(root / "good.json"), mixed=str(root / "mixed.json"), good=good)


def _pipeline(world, config, json_path, batch=4):
  data = pl.DataConfig.from_config(dict(json=json_path, image_folder=world["images"], template="vicuna_v1",
                                        max_len=MAX_LEN, buckets=(192,), max_images=2, max_tiles=8, shuffle=False))
  from llava_jax.data.processor import load_tokenizer
  image_processor = images_lib.ImageProcessor.from_folder(world["tokenizer"])
  return pl.make_pipeline(data, load_tokenizer(world["tokenizer"]), image_processor, layout=layout_for(config),
                          global_batch_size=batch, seed=0, process_index=0, process_count=1)


@pytest.fixture(scope="module")
def hf_model():
  return tiny_hf_next_model(seed=3)


def test_rows_carry_their_own_tiles_tokens_and_feature_index_and_bad_samples_are_counted(world, hf_model):
  config = our_config(hf_model)
  layout = layout_for(config)
  pipe = _pipeline(world, config, world["mixed"])
  it = pipe.iterator()
  batches = [next(it) for _ in range(3)]  # the 12 good rows, in file order
  assert dict(it.skip_counts) == {"corrupt_image": 1, "too_many_images": 1}
  assert int(batches[-1]["skipped"]) == 2
  records = iter(world["good"])
  for batch in batches:
    assert batch["pixel_values"].shape[1] in pl.tile_buckets(8, True) and batch["input_ids"].shape[1] in (192, MAX_LEN)
    counts = []
    for row in range(4):
      sizes = [Image.open(os.path.join(world["images"], n)).size[::-1] for n in next(records)["image"]]
      index = images_feature_index(layout, sizes)
      ids = batch["input_ids"][row]
      counts.append(int((ids == config.image_token_index).sum()))
      assert counts[-1] == len(index) == sum(layout.num_image_tokens(s) for s in sizes)
      np.testing.assert_array_equal(batch[pl.FEATURE_INDEX][row, :len(index)], index)
      tiles = sum(layout.tiles(s) for s in sizes)
      assert np.abs(batch["pixel_values"][row, :tiles]).sum(axis=(1, 2, 3)).min() > 0
      assert not batch["pixel_values"][row, tiles:].any()
    assert len(set(counts)) > 1  # rows of one batch give different image-token counts


def test_loss_equals_transformers_llava_next(world, hf_model):
  """Our pipeline's batch (rows of a square, a wide + a tall, a tall image) through our train-step loss, and the same
  samples through LlavaNextForConditionalGeneration with labels = our loss mask: the same loss."""
  config = our_config(hf_model)
  rows = [[0], [1, 2], [2], [5]]
  records = [_record(i, [f"s{k}.png" for k in ks], "A green circle.") for i, ks in enumerate(rows)]
  path = os.path.join(world["root"], "parity.json")
  with open(path, "w") as f:
    json.dump(records, f)
  batch = next(_pipeline(world, config, path).iterator())
  params = hf_to_params(hf_state(hf_model).__getitem__, config)
  logits, _ = Llava(config).apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                                  batch["attention_mask"], image_feature_index=batch[pl.FEATURE_INDEX])
  total, count = trainer.masked_ce_sum(logits, batch["input_ids"], batch["loss_mask"])
  ours = float(total / count)

  images = [Image.open(os.path.join(world["images"], f"s{k}.png")).convert("RGB") for ks in rows for k in ks]
  pixels = next_image_processor()(images, return_tensors="pt")
  ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
  labels = torch.where(torch.from_numpy(batch["loss_mask"]) > 0, ids, torch.full_like(ids, -100))
  with torch.no_grad():
    reference = hf_model(input_ids=ids, attention_mask=torch.from_numpy(batch["attention_mask"]), labels=labels,
                         pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"]).loss.item()
  assert abs(ours - reference) <= 1e-5 * abs(reference), (ours, reference)


def _opt_config():
  return ml_collections.ConfigDict(dict(lr=1e-3, warmup_ratio=0.0, weight_decay=0.01, max_grad_norm=1.0,
                                        adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8))


def test_lr_multiplier_scales_the_update_exactly_and_every_parameter_needs_a_rule(hf_model):
  """One AdamW step of the same gradients with the tower at 0.1 and at 1: the tower's update is 0.1 times the
  other's (weight decay included), every other trained update is the same, frozen ones are zero."""
  params = jax.tree.map(np.asarray, nn.unbox(abstract_params(our_config(hf_model))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
  grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
  trainable = [("language_model/embed_tokens/.*", False), (".*", True)]
  scaled = optim.lr_multipliers(params, trainable, [("vision_tower/.*", 0.1), (".*", 1.0)])
  plain = optim.lr_multipliers(params, trainable)

  def update(multipliers):
    tx, _ = optim.make_optimizer(_opt_config(), multipliers, total_steps=10)
    return trainer_flat(tx.update(grads, tx.init(params), params)[0])

  got, reference = update(scaled), update(plain)
  for path, value in got.items():
    if path.startswith("vision_tower/"):
      np.testing.assert_array_equal(value, reference[path] * np.float32(0.1), err_msg=path)
    elif path.startswith("language_model/embed_tokens/"):
      assert not value.any(), path
    else:
      np.testing.assert_array_equal(value, reference[path], err_msg=path)
  assert any(v.any() for p, v in got.items() if p.startswith("vision_tower/"))
  with pytest.raises(LlavaJaxError, match="parameter 'image_newline' matches no `lr_multipliers` rule"):
    optim.lr_multipliers(params, [(".*", True)], [("vision_tower/.*", 0.1), ("projector/.*", 1.0),
                                                   ("language_model/.*", 1.0)])
  with pytest.raises(LlavaJaxError, match=r"lr_multipliers rule \('.\*', -1.0\) must be \(regex, float >= 0\)"):
    optim.lr_multipliers(params, [(".*", True)], [(".*", -1.0)])


def trainer_flat(tree):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _next_args(world, workdir, stage, **overrides):
  values = {"data.max_len": MAX_LEN, "data.buckets": "(192,)", "data.max_images": 2, "data.max_tiles": 8,
            "data.template": "plain" if stage == "pretrain" else "vicuna_v1", "checkpoint_every": 0,
            "batch_size": 8, "mesh.data": -1}
  values.update(overrides)
  return F.train_args(world, workdir, stage=stage, config=NEXT_CONFIG, **values)


def test_both_stages_train_what_they_should(world, tmp_path):
  """Stage 1 moves only the projector and image_newline (the rest bit-identical); stage 2, from stage 1, moves
  every parameter that has a gradient; both on batches mixing image sizes."""
  stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
  train_main.run(_next_args(world, tmp_path / "init", "pretrain", total_steps=1, lr=0.0))
  initial = F.final_params(tmp_path / "init")  # the random init (at lr 0 a step moves nothing)
  train_main.run(_next_args(world, stage1, "pretrain", total_steps=2))
  after1 = F.final_params(stage1)
  for path in initial:
    moved = not np.array_equal(initial[path], after1[path])
    assert moved == (path.startswith("projector/") or path == "image_newline"), path
  train_main.run(_next_args(world, stage2, "finetune", total_steps=2, init=str(stage1)))
  after2 = F.final_params(stage2)
  # The tower's post_layernorm gets no gradient: the features come from its second-to-last layer.
  unused = {"vision_tower/post_layernorm/bias", "vision_tower/post_layernorm/scale"}
  assert {p for p in after1 if np.array_equal(after1[p], after2[p])} == unused
  assert [r["step"] for r in F.read_metrics(stage2)] == [1, 2]


def test_sigkill_then_rerun_equals_uninterrupted(world, tmp_path):
  command = lambda workdir: [sys.executable, "-m", "llava_jax", "train",
                             *_next_args(world, workdir, "finetune", total_steps=4, checkpoint_every=2)]
  assert_sigkill_then_rerun_equals_uninterrupted(command, tmp_path)


# Runs `llava-jax train`, printing each step's local and global tile counts as the host builds its global batch.
TILES_LOGGED = """
import sys
from llava_jax import cli
from llava_jax.data import pipeline
make_global_batch = pipeline.make_global_batch

def logged(batch, *args, **kwargs):
  out = make_global_batch(batch, *args, **kwargs)
  print(f"tiles local {batch['pixel_values'].shape[1]} global {out['pixel_values'].shape[1]}", file=sys.stderr)
  return out

pipeline.make_global_batch = logged
cli.main(["train", *sys.argv[1:]])
"""


def test_two_processes_with_different_tile_buckets_equal_one(world, tmp_path):
  """2 processes x 2 devices whose local batches pad their tiles to different buckets in every step agree on the
  global tile count and train as 1 process does on the same global batches (without shuffling each host takes
  every other record)."""
  # SIZES indices: 0 gives 3 tiles (bucket 4), 3 gives 5 (bucket 8); the last step mixes 4 and 5 tiles on host 1.
  images = [0, 3, 0, 3, 3, 0, 3, 0, 1, 5, 2, 4]
  records = [_record(i, [f"s{k}.png"], f"A {color} {shape}.")
             for i, (k, color, shape) in enumerate(zip(images, list(F.COLORS) * 3, F.SHAPES * 3))]
  path = os.path.join(world["root"], "alternating_tiles.json")
  with open(path, "w") as f:
    json.dump(records, f)
  command = lambda workdir: [sys.executable, "-m", "llava_jax", "train",
                             *_next_args(world, workdir, "finetune", total_steps=3, batch_size=4,
                                         **{"data.json": path, "data.shuffle": False})]
  logs = tmp_path / "logs"
  multi = two_processes([sys.executable, "-c", TILES_LOGGED, *command(tmp_path / "multi")[4:]], logs)
  code, err = finish(start(command(tmp_path / "single"), ONE_DEVICE))
  assert code == 0, err[-3000:]
  code, err = finish(multi)
  assert code == 0, err + "".join(log[-2000:] for log in read_logs(logs))
  tiles = [re.findall(r"tiles local (\d+) global (\d+)", log) for log in read_logs(logs)]
  assert tiles == [[("4", "8"), ("8", "8"), ("4", "8")], [("8", "8"), ("4", "8"), ("8", "8")]], tiles
  assert json.load(open(tmp_path / "multi" / "config.json"))["resolved"]["devices"] == 4
  single, multi = F.final_params(tmp_path / "single"), F.final_params(tmp_path / "multi")
  # Softmax ignores the key bias (it adds one constant to all of a query's scores): its gradient is rounding
  # noise, which no tolerance relative to the (zero-initialized) bias bounds.
  noise = "vision_tower/layers/self_attn/k_proj/bias"
  assert np.abs(single.pop(noise) - multi.pop(noise)).max() < 1e-8
  assert_params_close(single, multi)


def test_pad_preprocessing_is_refused_for_anyres(world, hf_model):
  data = pl.DataConfig.from_config(dict(json=world["json"], image_aspect_ratio="pad"))
  with pytest.raises(LlavaJaxError, match="data.image_aspect_ratio: 'pad' is LLaVA-1.5's"):
    pl.make_pipeline(data, None, None, layout=layout_for(our_config(hf_model)), global_batch_size=4, seed=0,
                     process_index=0, process_count=1)
