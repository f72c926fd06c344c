"""Parameter counts of the llava-1.5 configs equal transformers', without allocating either model."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llava_jax.models.llava import Llava


def _models_module():
  path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "models.py")
  spec = importlib.util.spec_from_file_location("configs_models", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


models = _models_module()


def _ours(config) -> int:
  v = config.vision
  ids = jax.ShapeDtypeStruct((1, config.image_seq_length + 2), jnp.int32)
  pixels = jax.ShapeDtypeStruct((1, 1, v.image_size, v.image_size, v.num_channels), jnp.float32)
  shapes = jax.eval_shape(lambda i, p: Llava(config).init(jax.random.key(0), i, p), ids, pixels)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def _theirs(hf_dict) -> int:
  with torch.device("meta"):
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**hf_dict))
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,approx", [("llava-1.5-7b", 7.06e9), ("llava-1.5-13b", 13.35e9), ("tiny", None)])
def test_param_count_matches_transformers(name, approx):
  ours = _ours(models.get(name))
  assert ours == _theirs(models.hf_dict(name))
  if approx:
    assert abs(ours / approx - 1) < 0.01, ours
