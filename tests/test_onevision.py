"""LLaVA-OneVision images (model_type llava_onevision) against transformers, built in-process: the SigLIP and
OneVision PIL image processors, LlavaOnevisionProcessor's token counting, the feature layout (pack_image_features
with its anyres_max downscaling), logits and greedy generations of LlavaOnevisionForConditionalGeneration, and
the HF folder round trip."""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from hf_fixtures import IMAGE_TOKEN, _perturbed, assert_hf_round_trip_bit_for_bit, hf_state, tiny_hf_config
from llava_jax.config import LlavaConfig
from llava_jax.data.anyres import NEWLINE
from llava_jax.data.images import ImageProcessor
from llava_jax.data.layouts import images_feature_index, images_pixels, layout_for, prompt_layout
from llava_jax.errors import LlavaJaxError
from llava_jax.image_tokens import FeatureMix
from llava_jax.infer.generate import Engine, Prompt
from llava_jax.weights.mapping import hf_to_params

TILE, PATCH = 28, 7  # 4x4 patches per tile
PINPOINTS = [[TILE * rows, TILE * cols] for rows in range(1, 4) for cols in range(1, 4)]
MAX_TILES = 2  # anyres_max_2: grids over 2 tiles' worth (32 features) by more than 1.1 are downscaled
NEW_TOKENS = 20
PAD = 0
SMALL, LARGE = (30, 25), (90, 80)  # a 1x1 tile grid, kept; a 3x3 one (12x10 features unpadded), downscaled to 6x5
THREE = [(40, 40), (30, 80), (90, 25)]
_rng = np.random.default_rng(11)
RANDOM_SIZES = [(int(h), int(w)) for h, w in _rng.integers(7, 300, (20, 2))]


def _image(size, seed=0):
  return Image.fromarray(np.random.default_rng(seed + size[0] * 1000 + size[1]).integers(
      0, 256, size + (3,), dtype=np.uint8))


def tiny_hf_onevision_config() -> transformers.LlavaOnevisionConfig:
  base = tiny_hf_config(text="qwen2", vision="siglip", head=False, feature_layer=-1, strategy="full",
                        image_size=TILE, patch_size=PATCH)
  return transformers.LlavaOnevisionConfig(
      vision_config=base.vision_config, text_config=base.text_config, image_token_index=IMAGE_TOKEN,
      video_token_index=IMAGE_TOKEN - 1, image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=f"anyres_max_{MAX_TILES}",
      vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=False)


@functools.lru_cache(maxsize=None)
def tiny_hf_onevision_model(seed=0) -> transformers.LlavaOnevisionForConditionalGeneration:
  torch.manual_seed(seed)
  model = _perturbed(transformers.LlavaOnevisionForConditionalGeneration(tiny_hf_onevision_config()).eval())
  model.generation_config.eos_token_id = None  # random weights: all 20 tokens are produced
  return model


def _config(hf_model) -> LlavaConfig:
  return LlavaConfig.from_hf_dict(hf_model.config.to_dict())


def reference_image_processor():
  return transformers.LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE},
                                                      image_grid_pinpoints=PINPOINTS)


def reference_token_count(size) -> int:
  """LlavaOnevisionProcessor._get_number_of_features for one lone image (the counting needs no torchvision)."""
  counter = types.SimpleNamespace(image_processor=reference_image_processor(), num_image_tokens=(TILE // PATCH) ** 2,
                                  vision_aspect_ratio=f"anyres_max_{MAX_TILES}")
  counter._get_unpadded_features = functools.partial(LlavaOnevisionProcessor._get_unpadded_features, counter)
  return LlavaOnevisionProcessor._get_number_of_features(counter, *size, TILE, TILE)


def _ours_processor() -> ImageProcessor:
  return ImageProcessor.from_config(reference_image_processor().to_dict())


# ---- config ------------------------------------------------------------------------------------


def test_config_json_round_trips_exactly():
  d = tiny_hf_onevision_model().config.to_dict()
  config = LlavaConfig.from_hf_dict(d)
  assert (config.model_type, config.vision_aspect_ratio, config.anyres_max_tiles) == (
      "llava_onevision", "anyres_max_2", 2)
  assert config.has_image_newline and config.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
  assert config.to_hf_dict() == d


def test_missing_keys_take_transformers_onevision_defaults():
  d = tiny_hf_onevision_model().config.to_dict()
  for key in ("vision_aspect_ratio", "image_grid_pinpoints", "vision_feature_layer", "vision_feature_select_strategy",
              "image_token_index"):
    d.pop(key)
  d["vision_config"] = dict(d["vision_config"], image_size=384, patch_size=14)
  config = LlavaConfig.from_hf_dict(d)
  reference = transformers.LlavaOnevisionConfig(**d)
  assert config.vision_aspect_ratio == reference.vision_aspect_ratio
  assert config.image_grid_pinpoints == tuple(map(tuple, reference.image_grid_pinpoints))
  assert (config.vision_feature_layer, config.vision_feature_select_strategy, config.image_token_index) == (
      reference.vision_feature_layer, reference.vision_feature_select_strategy, reference.image_token_id)


@pytest.mark.parametrize("value", ["anyres", "anyres_max_", "anyres_max_x", "anyres_max_0", 9])
def test_bad_vision_aspect_ratio_is_named(value):
  d = dict(tiny_hf_onevision_model().config.to_dict(), vision_aspect_ratio=value)
  with pytest.raises(LlavaJaxError, match=f"config.json: vision_aspect_ratio {value!r} is not anyres_max_N"):
    LlavaConfig.from_hf_dict(d)


# ---- preprocessing and token counts ------------------------------------------------------------


@pytest.mark.parametrize("size", RANDOM_SIZES)
def test_siglip_pixels_equal_siglip_image_processor(size):
  reference = transformers.SiglipImageProcessorPil(size={"height": 48, "width": 48})
  ours = ImageProcessor.from_config(reference.to_dict())
  image = _image(size)
  expected = reference([image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(ours([image]), expected)


def test_siglip_and_onevision_processors_take_their_classes_defaults():
  siglip = ImageProcessor.from_config({"image_processor_type": "SiglipImageProcessor"})
  onevision = ImageProcessor.from_config({"image_processor_type": "LlavaOnevisionImageProcessor"})
  for ours, theirs in ((siglip, transformers.SiglipImageProcessorPil()),
                       (onevision, transformers.LlavaOnevisionImageProcessorPil())):
    assert not ours.do_center_crop and ours.size == dict(theirs.size)
    assert (ours.image_mean, ours.image_std) == (tuple(theirs.image_mean), tuple(theirs.image_std))
    assert ours.resample == theirs.resample


@pytest.mark.parametrize("size", RANDOM_SIZES)
def test_lone_image_tiles_and_token_count_equal_onevision_processors(size):
  layout = layout_for(_config(tiny_hf_onevision_model()))
  image = _image(size)
  expected = reference_image_processor()([[image]], return_tensors="np")
  tiles = layout.tiles(size)
  np.testing.assert_array_equal(images_pixels(layout, [image], _ours_processor(), ["i"]),
                                expected["pixel_values"][0, :tiles].transpose(0, 2, 3, 1))
  assert layout.num_image_tokens(size) == reference_token_count(size)


def test_several_images_are_padded_squares_of_one_tile_and_newline():
  layout = prompt_layout(layout_for(_config(tiny_hf_onevision_model())), len(THREE))
  images = [_image(s, i) for i, s in enumerate(THREE)]
  expected = reference_image_processor()([images], return_tensors="np")
  assert list(expected["batch_num_images"]) == [3]
  np.testing.assert_array_equal(images_pixels(layout, images, _ours_processor(), ["a", "b", "c"]),
                                expected["pixel_values"][:, 0].transpose(0, 2, 3, 1))
  per_tile = (TILE // PATCH) ** 2
  assert [layout.num_image_tokens(s) for s in THREE] == [per_tile + 1] * 3  # the processor's num_image_tokens + 1


# ---- the feature layout ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [SMALL, LARGE] + RANDOM_SIZES)
def test_feature_mix_is_pack_image_features(size):
  """Features numbered by position go through transformers' pack_image_features (its interpolate included); our
  mix applied to the same numbers gives what comes out, newline included."""
  hf_model = tiny_hf_onevision_model()
  layout = layout_for(_config(hf_model))
  tiles, per_tile = layout.tiles(size), layout.tokens_per_tile
  numbered = torch.arange(tiles * per_tile, dtype=torch.float32).reshape(tiles, per_tile, 1)
  packed, lens = hf_model.model.pack_image_features([numbered], torch.tensor([size]),
                                                    image_newline=torch.tensor([-1000.0]),
                                                    vision_aspect_ratio=f"anyres_max_{MAX_TILES}")
  mix = layout.feature_index(size)
  assert isinstance(mix, FeatureMix) and int(lens[0]) == len(mix.index) == layout.num_image_tokens(size)
  values = np.where(mix.index == NEWLINE, -1000.0, mix.index).astype(np.float32)
  np.testing.assert_allclose((values * mix.weights).sum(-1), packed[0][:, 0].numpy(), rtol=1e-6, atol=1e-4)


def test_large_image_is_downscaled_and_small_one_kept():
  layout = layout_for(_config(tiny_hf_onevision_model()))
  per_tile = layout.tokens_per_tile
  assert layout.num_image_tokens(SMALL) == per_tile + 4 * 5
  assert layout.num_image_tokens(LARGE) == per_tile + 6 * 6  # 12x10 grid -> 6x5 plus newlines
  assert np.count_nonzero(layout.feature_index(LARGE).weights[per_tile:, 1:]) > 0


# ---- model and engine against transformers -----------------------------------------------------


def _prompt(images, seed=0):
  """Token ids with each image's tokens (counted by our layout) between random text, our feature index, pixels;
  and transformers' inputs for the same (its pixel values, image_sizes, batch_num_images)."""
  rng = np.random.default_rng(seed)
  layout = prompt_layout(layout_for(_config(tiny_hf_onevision_model())), len(images))
  pictures = [_image(s, i) for i, s in enumerate(images)]
  ids = [rng.integers(3, IMAGE_TOKEN - 2, 5)]
  for size in images:
    ids += [np.full(layout.num_image_tokens(size), IMAGE_TOKEN), rng.integers(3, IMAGE_TOKEN - 2, 4)]
  ids = np.concatenate(ids).astype(np.int32)
  names = [f"image {i}" for i in range(len(images))]
  ours = Prompt(ids, images_pixels(layout, pictures, _ours_processor(), names),
                images_feature_index(layout, images, names))
  theirs = reference_image_processor()([pictures], return_tensors="pt")
  theirs = dict(input_ids=torch.from_numpy(ids[None]).long(), pixel_values=theirs["pixel_values"],
                image_sizes=theirs["image_sizes"], batch_num_images=theirs["batch_num_images"])
  return ours, theirs


@pytest.fixture(scope="module")
def engine():
  hf_model = tiny_hf_onevision_model()
  config = _config(hf_model)
  return Engine(config, hf_to_params(hf_state(hf_model).__getitem__, config), eos_token_ids=[], pad_token_id=PAD)


@pytest.mark.parametrize("images", [[SMALL], [LARGE], THREE], ids=["small", "downscaled", "three_images"])
def test_logits_and_generations_equal_transformers(engine, images):
  hf_model = tiny_hf_onevision_model()
  ours, theirs = _prompt(images)
  with torch.no_grad():
    want = hf_model(**theirs).logits[0].numpy()
    generated = hf_model.generate(**theirs, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
  logits, mask = engine.forward([ours])
  got = logits[0][mask[0]]
  assert np.abs(want).max() > 1.0
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
  np.testing.assert_array_equal(engine.generate([ours], NEW_TOKENS)[0].tokens,
                                generated[0, len(ours.input_ids):].numpy())


def test_batch_mixing_a_downscaled_image_and_several_images_equals_row_by_row(engine):
  """Rows of both index kinds in one left-padded batch (the several-image row's index made a mix)."""
  prompts = [_prompt([LARGE])[0], _prompt(THREE, seed=1)[0]]
  together = engine.generate(prompts, NEW_TOKENS)
  for prompt, row in zip(prompts, together):
    np.testing.assert_array_equal(row.tokens, engine.generate([prompt], NEW_TOKENS)[0].tokens)


# ---- conversion --------------------------------------------------------------------------------


def test_hf_folder_round_trips_bit_for_bit(tmp_path):
  hf_model = tiny_hf_onevision_model()
  assert_hf_round_trip_bit_for_bit(tmp_path, hf_model, _config(hf_model))
