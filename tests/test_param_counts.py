"""Parameter counts of the configs/models.py architectures (LLaVA-1.5, the released LLaVA-NeXT, OneVision and
NeXT-Video models) equal transformers', without allocating either model."""

import importlib.util
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from llava_jax.models.llava import abstract_params


def _models_module():
  path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "models.py")
  spec = importlib.util.spec_from_file_location("configs_models", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


models = _models_module()


def _ours(config) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))


def _theirs(hf_dict) -> int:
  classes = {"llava": (transformers.LlavaConfig, transformers.LlavaForConditionalGeneration),
             "llava_next": (transformers.LlavaNextConfig, transformers.LlavaNextForConditionalGeneration),
             "llava_onevision": (transformers.LlavaOnevisionConfig,
                                 transformers.LlavaOnevisionForConditionalGeneration),
             "llava_next_video": (transformers.LlavaNextVideoConfig,
                                  transformers.LlavaNextVideoForConditionalGeneration)}
  config_class, model_class = classes[hf_dict["model_type"]]
  with torch.device("meta"):
    model = model_class(config_class(**hf_dict))
  return sum(p.numel() for p in model.parameters())


# Approximate published sizes (to 1%): a typo in a width or a layer count shows up here.
SIZES = {"llava-1.5-7b": 7.06e9, "llava-1.5-13b": 13.35e9, "tiny": None, "tiny-next": None, "tiny-ov": None,
         "llava-v1.6-vicuna-7b": 7.06e9, "llava-v1.6-vicuna-13b": 13.35e9,
         "llava-v1.6-mistral-7b": 7.57e9, "llava-v1.6-34b": 34.76e9, "llava-next-llama3-8b": 8.36e9,
         "llava-next-72b": 72.7e9, "llava-next-110b": 111.5e9, "llava-onevision-qwen2-0.5b-ov": 0.894e9,
         "llava-onevision-qwen2-7b-ov": 8.03e9, "llava-onevision-qwen2-72b-ov": 73.2e9,
         "llava-next-video-7b": 7.06e9}


def test_every_model_is_counted():
  assert sorted(SIZES) == sorted(models.MODELS)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_param_count_matches_transformers(name):
  ours = _ours(models.get(name))
  assert ours == _theirs(models.hf_dict(name))
  if SIZES[name]:
    assert abs(ours / SIZES[name] - 1) < 0.01, ours
