"""The LLaVA recipe on a tiny transformers model: HF folder -> hf-to-jax -> stage 1 (pretrain) ->
stage 2 (finetune, init = the stage-1 workdir) -> jax-to-hf -> transformers, logits equal ours."""

import jax
import numpy as np
import torch
import transformers

from llava_jax.data import images
from llava_jax.models.llava import Llava
from llava_jax.train import main as train_main
from llava_jax.weights import convert
from llava_jax.weights.model_folder import load_model

from hf_fixtures import IMAGE_TOKEN, tiny_hf_model
from tokenizer_fixture import build_tiny_tokenizer

import train_fixtures as F


def flat(params):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_hf_model_through_both_stages_and_back(tmp_path):
  world = F.make_world(tmp_path / "world")
  hf_dir = tmp_path / "hf"
  tiny_hf_model(seed=1).save_pretrained(hf_dir)
  build_tiny_tokenizer(hf_dir, corpus=[line for line in open(world["json"])] * 2)
  images.ImageProcessor.default(28, pad_to_square=True).save(hf_dir)
  convert.hf_to_jax(str(hf_dir), str(tmp_path / "converted"))

  common = {"mesh.data": -1, "batch_size": 8, "total_steps": 2, "tokenizer": ""}
  stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
  train_main.run(F.train_args(world, stage1, stage="pretrain", init=tmp_path / "converted", **common))
  # Stage 2 also covers bfloat16 compute with full remat (parameters stay float32).
  train_main.run(F.train_args(world, stage2, stage="finetune", init=stage1, lr=1e-3, dtype="bfloat16",
                              remat_policy="full", **common,
                              **{"data.max_len": 224, "data.buckets": "(224,)"}))  # vicuna_v1's system prompt

  original, after1, after2 = (flat(load_model(str(p)).params) for p in (tmp_path / "converted", stage1, stage2))
  assert all(value.dtype == np.float32 for value in after2.values())
  assert [r["step"] for r in F.read_metrics(stage2)] == [1, 2] and F.read_metrics(stage2)[-1]["loss"] > 0
  for path in original:
    if path.startswith("vision_tower/"):
      assert np.array_equal(original[path], after2[path]), path
    if not path.startswith("projector/"):
      assert np.array_equal(original[path], after1[path]), path
  assert not np.array_equal(original["projector/linear_1/kernel"], after1["projector/linear_1/kernel"])
  assert not np.array_equal(after1["language_model/lm_head/kernel"], after2["language_model/lm_head/kernel"])

  exported = tmp_path / "exported"
  convert.jax_to_hf(str(stage2), str(exported))
  hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(exported).eval()
  loaded = load_model(str(stage2))
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 120, (2, 30)).astype(np.int64)
  ids[:, 1:17] = IMAGE_TOKEN
  pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
  ours, _ = Llava(loaded.config).apply({"params": loaded.params}, ids.astype(np.int32),
                                       pixels.transpose(0, 2, 3, 1)[:, None], np.ones(ids.shape, np.int32))
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
