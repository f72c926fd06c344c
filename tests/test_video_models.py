"""Videos in LLaVA-OneVision and LLaVA-NeXT-Video (llava_next_video) against transformers, built in-process: the
per-frame pixel values (transformers' image processors applied frame by frame: its video processors need
torchvision), the processors' video token counts and token ids, logits and greedy generations of
LlavaOnevisionForConditionalGeneration and LlavaNextVideoForConditionalGeneration for a video row and a batch
mixing an image row and a video row, NeXT-Video's config and HF folder round trip, and bad input."""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler
from transformers.models.llava_next_video.processing_llava_next_video import LlavaNextVideoProcessor
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from hf_fixtures import (NEXT_IMAGE_SIZE, NEXT_PINPOINTS, _perturbed, assert_hf_round_trip_bit_for_bit, hf_state,
                         next_image_processor, tiny_hf_config)
from tokenizer_fixture import build_word_tokenizer
from llava_jax.config import LlavaConfig
from llava_jax.data.images import ImageProcessor
from llava_jax.data.layouts import layout_for
from llava_jax.data.processor import Processor
from llava_jax.data.video import video_layout_for
from llava_jax.errors import LlavaJaxError
from llava_jax.infer.generate import Engine, Prompt
from llava_jax.models.llava import spatial_pool
from llava_jax.weights.mapping import hf_to_params

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>"]
IMAGE_TOKEN, VIDEO_TOKEN = SPECIALS.index("<image>"), SPECIALS.index("<video>")
PAD, NEW_TOKENS = 0, 20
OV_TILE, PATCH = 35, 7  # OneVision: 5x5 patches per frame, pooled bilinearly to 3x3 (halves rounded up)
VIDEO_TEXT, IMAGE_TEXT = "USER: <video> what happens here ? ASSISTANT:", "USER: <image> what is this ? ASSISTANT:"
BOTH_TEXT = "USER: <image> two <video> what happens here ? ASSISTANT:"
VIDEOS = [(8, (30, 45)), (3, (50, 20))]  # (frames, (height, width)): two videos of different sizes and lengths
IMAGE_SIZE = (40, 60)


def _frames(count, size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count,) + size + (3,), dtype=np.uint8)


def _image(size, seed=0):
  return Image.fromarray(_frames(1, size, seed + 100)[0])


@functools.lru_cache(maxsize=None)
def tokenizer():
  return build_word_tokenizer([VIDEO_TEXT, IMAGE_TEXT, "<video> <image> two"], SPECIALS)


def _text_and_vision(text, vision, **kwargs):
  base = tiny_hf_config(text=text, vision=vision, head=False, **kwargs)
  base.vision_config.num_hidden_layers = 2
  return dict(vision_config=base.vision_config, text_config=base.text_config, image_token_index=IMAGE_TOKEN,
              video_token_index=VIDEO_TOKEN, tie_word_embeddings=False)


@functools.lru_cache(maxsize=None)
def onevision_model():
  torch.manual_seed(0)
  config = transformers.LlavaOnevisionConfig(
      **_text_and_vision("qwen2", "siglip", feature_layer=-1, strategy="full", image_size=OV_TILE, patch_size=PATCH),
      image_grid_pinpoints=[[OV_TILE * r, OV_TILE * c] for r in (1, 2) for c in (1, 2)],
      vision_aspect_ratio="anyres_max_2", vision_feature_layer=-1, vision_feature_select_strategy="full")
  return _no_eos(_perturbed(transformers.LlavaOnevisionForConditionalGeneration(config).eval()))


@functools.lru_cache(maxsize=None)
def next_video_model(mode="average"):
  torch.manual_seed(1)
  config = transformers.LlavaNextVideoConfig(
      **_text_and_vision("llama", "clip", image_size=NEXT_IMAGE_SIZE, patch_size=PATCH),
      image_grid_pinpoints=NEXT_PINPOINTS, spatial_pool_mode=mode, spatial_pool_stride=2)
  return _no_eos(_perturbed(transformers.LlavaNextVideoForConditionalGeneration(config).eval()))


def _no_eos(model):
  model.generation_config.eos_token_id = None  # random weights: all 20 tokens are produced
  return model


def _config(hf_model) -> LlavaConfig:
  return LlavaConfig.from_hf_dict(hf_model.config.to_dict())


# transformers' per-frame pixels: OneVision's image processor's whole-image resize (its first patch), and the
# CLIP resize-and-crop of NeXT-Video's video processor; both as their video processors' default settings.
def _ov_image_processor():
  pinpoints = onevision_model().config.image_grid_pinpoints
  return transformers.LlavaOnevisionImageProcessorPil(size={"height": OV_TILE, "width": OV_TILE},
                                                      image_grid_pinpoints=pinpoints)


def _reference_frames(kind, frames):
  if kind == "onevision":
    pixels = [_ov_image_processor()([[Image.fromarray(f)]], return_tensors="np")["pixel_values"][0, 0]
              for f in frames]
  else:
    clip = transformers.CLIPImageProcessorPil(size={"shortest_edge": NEXT_IMAGE_SIZE},
                                              crop_size={"height": NEXT_IMAGE_SIZE, "width": NEXT_IMAGE_SIZE})
    pixels = [clip([Image.fromarray(f)], return_tensors="np")["pixel_values"][0] for f in frames]
  return np.stack(pixels)  # (F, 3, S, S)


def _reference_video_tokens(kind, hf_model, pixels) -> int:
  """The processor's replace_video_token for one video of these (F, 3, S, S) pixel values."""
  config = hf_model.config
  if kind == "onevision":
    side = config.vision_config.image_size // config.vision_config.patch_size
    counter = types.SimpleNamespace(num_image_tokens=side ** 2, video_token="<video>")
    return LlavaOnevisionProcessor.replace_video_token(counter, {"pixel_values_videos": [pixels]}, 0).count("<video>")
  counter = types.SimpleNamespace(patch_size=config.vision_config.patch_size, video_token="<video>")
  return LlavaNextVideoProcessor.replace_video_token(counter, {"pixel_values_videos": [pixels]}, 0).count("<video>")


@functools.lru_cache(maxsize=None)
def processor(kind, mode=None):
  hf_model = onevision_model() if kind == "onevision" else next_video_model(mode or "average")
  config = _config(hf_model)
  reference = _ov_image_processor() if kind == "onevision" else next_image_processor()
  images = ImageProcessor.from_config(reference.to_dict())
  return Processor(tokenizer(), images, layout_for(config), video_layout=video_layout_for(config))


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["average", "max", "conv"])
def test_next_video_config_round_trips_exactly(mode):
  d = next_video_model(mode).config.to_dict()
  config = LlavaConfig.from_hf_dict(d)
  assert (config.model_type, config.spatial_pool_mode, config.spatial_pool_stride) == ("llava_next_video", mode, 2)
  assert config.media_token_ids == (IMAGE_TOKEN, VIDEO_TOKEN) and config.to_hf_dict() == d
  assert _config(onevision_model()).video_token_index == VIDEO_TOKEN


def test_next_video_defaults_are_transformers():
  d = next_video_model().config.to_dict()
  for key in ("image_token_index", "video_token_index", "spatial_pool_mode", "spatial_pool_stride",
              "image_grid_pinpoints", "vision_feature_layer", "vision_feature_select_strategy"):
    d.pop(key)
  config, reference = LlavaConfig.from_hf_dict(d), transformers.LlavaNextVideoConfig(**d)
  assert (config.image_token_index, config.video_token_index, config.spatial_pool_mode, config.spatial_pool_stride,
          config.vision_feature_layer, config.vision_feature_select_strategy) == (
      reference.image_token_index, reference.video_token_index, reference.spatial_pool_mode,
      reference.spatial_pool_stride, reference.vision_feature_layer, reference.vision_feature_select_strategy)
  assert config.image_grid_pinpoints == tuple(map(tuple, reference.image_grid_pinpoints))


@pytest.mark.parametrize("key,value,message", [
    ("spatial_pool_mode", "mean", "spatial_pool_mode 'mean' is not supported"),
    ("vision_feature_layer", [-2, -1], "spatial_pool_mode 'conv' takes the vision tower's hidden size"),
    ("spatial_pool_stride", 0, "spatial_pool_stride 0 is not a positive int of at most the 4 patches per side")])
def test_bad_pooling_is_named(key, value, message):
  with pytest.raises(LlavaJaxError, match=message):
    LlavaConfig.from_hf_dict(dict(next_video_model("conv").config.to_dict(), **{key: value}))


# ---- pixels and token ids ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["onevision", "next_video"])
def test_two_videos_pixels_and_token_ids_equal_the_processors(kind):
  hf_model = onevision_model() if kind == "onevision" else next_video_model()
  ours = processor(kind)
  videos = [_frames(n, size, seed) for seed, (n, size) in enumerate(VIDEOS)]
  text = "USER: <video> two <video> what happens here ? ASSISTANT:"
  got = ours.encode(text, [], videos=videos)
  references = [_reference_frames(kind, v) for v in videos]
  np.testing.assert_array_equal(got.pixel_values, np.concatenate(references).transpose(0, 2, 3, 1))
  counts = [_reference_video_tokens(kind, hf_model, r) for r in references]
  assert counts == [ours.video_layout.num_video_tokens(n) for n, _ in VIDEOS]
  first, second, rest = text.split("<video>")
  expected = tokenizer()(first + "<video>" * counts[0] + second + "<video>" * counts[1] + rest)["input_ids"]
  np.testing.assert_array_equal(got.input_ids, expected)
  assert (got.input_ids == VIDEO_TOKEN).sum() == sum(counts) > 0


# ---- model and engine against transformers -----------------------------------------------------


def _rows(kind, mode=None):
  """Our prompts of a video row (8 frames), an image row and a row with an image then a video, with transformers'
  inputs for each."""
  ours = processor(kind, mode)
  frames, picture = _frames(*VIDEOS[0]), _image(IMAGE_SIZE)
  video = {"pixel_values_videos": torch.from_numpy(_reference_frames(kind, frames))[None]}
  image = (_ov_image_processor()([[picture]], return_tensors="pt") if kind == "onevision"
           else next_image_processor()([picture], return_tensors="pt"))
  image = {key: image[key] for key in ("pixel_values", "image_sizes", "batch_num_images") if key in image}
  rows = {"video": (VIDEO_TEXT, [], [frames], video), "image": (IMAGE_TEXT, [picture], [], image),
          "both": (BOTH_TEXT, [picture], [frames], dict(image, **video))}
  out = {}
  for name, (text, images, videos, theirs) in rows.items():
    prompt = ours.encode(text, images, videos=videos)
    out[name] = Prompt.of(prompt), dict(theirs, input_ids=torch.from_numpy(prompt.input_ids[None]).long())
  return out


def _assert_equal(engine, hf_model, rows):
  """Our batch of `rows` (left padded) against transformers run on each row alone."""
  prompts = [prompt for prompt, _ in rows]
  logits, mask = engine.forward(prompts)
  generated = engine.generate(prompts, NEW_TOKENS)
  for row, (prompt, theirs) in enumerate(rows):
    with torch.no_grad():
      want = hf_model(**theirs).logits[0].numpy()
      tokens = hf_model.generate(**theirs, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    got = logits[row][mask[row]]
    assert np.abs(want).max() > 1.0
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, row
    np.testing.assert_array_equal(generated[row].tokens, tokens[0, len(prompt.input_ids):].numpy())


@pytest.mark.parametrize("kind,mode", [("onevision", None), ("next_video", "average"), ("next_video", "max"),
                                       ("next_video", "conv")])
def test_logits_and_generations_equal_transformers(kind, mode):
  """The 8-frame video row (transformers runs each row alone) in a batch with an image row and a row with both;
  NeXT-Video's image row alone too."""
  hf_model = onevision_model() if kind == "onevision" else next_video_model(mode)
  config = _config(hf_model)
  engine = Engine(config, hf_to_params(hf_state(hf_model).__getitem__, config), eos_token_ids=[], pad_token_id=PAD)
  rows = _rows(kind, mode)
  _assert_equal(engine, hf_model, [rows["image"], rows["video"], rows["both"]])
  if mode == "average":
    _assert_equal(engine, hf_model, [rows["image"]])


@pytest.mark.parametrize("mode", ["average", "max"])
def test_spatial_pool_is_next_videos_pooler(mode):
  """transformers' LlavaNextVideoPooler (AvgPool2d / MaxPool2d) on a 5x5 grid: the last row and column dropped."""
  vision = {"model_type": "clip_vision_model", "image_size": 35, "patch_size": 7, "hidden_size": 8,
            "num_attention_heads": 2}
  config = transformers.LlavaNextVideoConfig(vision_config=vision, spatial_pool_mode=mode)
  features = np.random.default_rng(0).standard_normal((3, 25, 8)).astype(np.float32)
  want = LlavaNextVideoPooler(config)(torch.from_numpy(features)).numpy()
  np.testing.assert_allclose(np.asarray(spatial_pool(features, mode, 2)), want, rtol=1e-6, atol=1e-6)


# ---- conversion --------------------------------------------------------------------------------


def test_next_video_hf_folder_round_trips_bit_for_bit(tmp_path):
  """With `conv` pooling: its convolution's weights included."""
  hf_model = next_video_model("conv")
  assert_hf_round_trip_bit_for_bit(tmp_path, hf_model, _config(hf_model))


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_videos_are_named():
  ours = processor("onevision")
  with pytest.raises(LlavaJaxError, match=r"^video 1: no frames$"):
    ours.encode(VIDEO_TEXT, [], videos=[np.zeros((0, 20, 20, 3), np.uint8)])
  with pytest.raises(LlavaJaxError, match=r"^video 1: 57 frames take 514 video tokens, more than the model's 512 "):
    ours.encode(VIDEO_TEXT, [], videos=[_frames(57, (8, 8))])
  with pytest.raises(LlavaJaxError, match=r"^video 1: frames must be uint8 arrays of one \(height, width, 3\) shape"):
    ours.encode(VIDEO_TEXT, [], videos=[[_frames(1, (8, 8))[0], _frames(1, (9, 8))[0]]])
  with pytest.raises(LlavaJaxError, match=r"^prompt has 1 <video> tag\(s\) but 2 video\(s\) were given"):
    ours.encode(VIDEO_TEXT, [], videos=[_frames(1, (8, 8)), _frames(1, (8, 8))])
  with pytest.raises(LlavaJaxError, match=r"^prompt has 0 <image> tag\(s\) but 1 image\(s\) were given"):
    ours.encode(VIDEO_TEXT, [_image(IMAGE_SIZE)], videos=[_frames(1, (8, 8))])
  plain = Processor(tokenizer(), ours.image_processor, ours.layout)
  with pytest.raises(LlavaJaxError, match=r"^this model takes no videos$"):
    plain.encode(VIDEO_TEXT, [], videos=[_frames(1, (8, 8))])
  with pytest.raises(LlavaJaxError, match=r"^a llava_next model takes no videos"):
    video_layout_for(_config(onevision_model()).replace(model_type="llava_next", vision_aspect_ratio=None,
                                                        video_token_index=None))
