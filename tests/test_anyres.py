"""AnyRes geometry, pixels and token counts against transformers' LLaVA-NeXT classes, built in-process:
LlavaNextImageProcessorPil (pixel tiles), LlavaNextProcessor (the `<image>` expansion, counted in its
token ids) and modeling_llava_next's select_best_resolution, grid shape, tile count and unpad_image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next import modeling_llava_next as hf_modeling
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava_jax.data import anyres
from llava_jax.data.anyres import AnyResLayout, anyres_pixels
from llava_jax.data.images import ImageProcessor
from llava_jax.errors import LlavaJaxError
from tokenizer_fixture import build_tiny_tokenizer

V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# Image processor config (as in preprocessor_config.json) and the model side of each test config.
CONFIGS = {
    # llava-v1.6 (llava-hf/llava-v1.6-*): 336-px CLIP tiles, bicubic, CLS dropped by "default".
    "v1.6": dict(
        processor={"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
                   "image_grid_pinpoints": V16_PINPOINTS},
        patch_size=14, strategy="default", num_additional_image_tokens=1),
    # Small tiles that the processor resizes to a non-square size and crops back, bilinear, its own
    # mean and std, no CLS token and the "full" strategy.
    "small": dict(
        processor={"size": {"height": 36, "width": 44}, "crop_size": {"height": 28, "width": 28},
                   "resample": 2, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.25],
                   "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28], [84, 84]]},
        patch_size=14, strategy="full", num_additional_image_tokens=0),
}

# Sizes (height, width) where two or more pinpoints show the same number of pixels (checked below):
# first by shown pixels AND wasted area (the first listed must win), or by shown pixels only.
TIE_SIZES = {"v1.6": [(100, 100), (50, 150), (200, 200), (360, 720)],
             "small": [(20, 20), (20, 60), (43, 130), (97, 295)]}

# Sizes whose unpadded grid side is a whole number that floats compute just below it (55 * (48 / 176)
# = 14.999...): transformers rounds to 7 digits before truncating, which decides the padding.
ROUNDING_SIZES = {"v1.6": [(55, 176), (176, 198), (47, 1128)], "small": [(47, 94), (49, 294)]}

_rng = np.random.default_rng(24)
RANDOM_SIZES = [(int(h), int(w)) for h, w in _rng.integers(20, 1501, (24, 2))]
# (15000, 14): so thin that every pinpoint shows 0 pixels of it (the least area then wins).
SIZES = RANDOM_SIZES + [(20, 20), (1500, 300), (300, 1500), (672, 672), (336, 1008), (15000, 14)]


def _layout(name):
  config = CONFIGS[name]
  return AnyResLayout(image_size=config["processor"]["crop_size"]["height"], patch_size=config["patch_size"],
                      grid_pinpoints=config["processor"]["image_grid_pinpoints"],
                      vision_feature_select_strategy=config["strategy"],
                      num_additional_image_tokens=config["num_additional_image_tokens"])


@pytest.fixture(scope="module")
def hf_processors(tmp_path_factory):
  tokenizer = build_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
  processors = {}
  for name, config in CONFIGS.items():
    image_processor = LlavaNextImageProcessorPil(**config["processor"])
    processors[name] = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config["patch_size"],
        vision_feature_select_strategy=config["strategy"],
        num_additional_image_tokens=config["num_additional_image_tokens"])
  return processors


def _random_image(height, width):
  rng = np.random.default_rng(height * 10_000 + width)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _shown_and_wasted(image_hw, pinpoints):
  """(shown pixels, wasted area) of each pinpoint, spelled out from LLaVA-NeXT's description."""
  height, width = image_hw
  out = []
  for pin_h, pin_w in pinpoints:
    scale = min(pin_w / width, pin_h / height)
    shown = min(int(width * scale) * int(height * scale), width * height)
    out.append((shown, pin_h * pin_w - shown))
  return out


@pytest.mark.parametrize("name", sorted(TIE_SIZES))
def test_tie_sizes_tie(name):
  pinpoints = CONFIGS[name]["processor"]["image_grid_pinpoints"]
  full_ties = 0
  for size in TIE_SIZES[name]:
    fits = _shown_and_wasted(size, pinpoints)
    most = max(shown for shown, _ in fits)
    tied = [fit for fit in fits if fit[0] == most]
    assert len(tied) >= 2, (size, fits)
    full_ties += tied.count(min(tied, key=lambda fit: fit[1])) >= 2
  assert full_ties >= 1


@pytest.mark.parametrize("name,size", [(name, size) for name in sorted(CONFIGS)
                                       for size in SIZES + TIE_SIZES[name] + ROUNDING_SIZES[name]])
def test_matches_transformers(hf_processors, name, size):
  hf_processor = hf_processors[name]
  layout = _layout(name)
  pinpoints = CONFIGS[name]["processor"]["image_grid_pinpoints"]
  ours = ImageProcessor.from_config(CONFIGS[name]["processor"])
  img = _random_image(*size)

  assert anyres.select_best_resolution(size, pinpoints) == tuple(hf_select_best_resolution(size, pinpoints))
  assert layout.grid_shape(size) == tuple(hf_modeling.get_anyres_image_grid_shape(
      list(size), pinpoints, layout.image_size))

  hf_out = hf_processor(images=[img], text=["<image>"], return_tensors="np")
  expected = hf_out["pixel_values"][0].transpose(0, 2, 3, 1)
  pixels = anyres_pixels(img, ours, layout)
  assert pixels.dtype == np.float32
  assert pixels.shape == expected.shape
  assert len(pixels) == hf_modeling.image_size_to_num_patches(list(size), pinpoints, layout.image_size)
  np.testing.assert_allclose(pixels, expected, rtol=0, atol=1e-5)

  num_tokens = int((hf_out["input_ids"] == hf_processor.image_token_id).sum())
  assert layout.num_image_tokens(size) == num_tokens


def test_llava_v16_token_counts_from_the_issue():
  layout = _layout("v1.6")
  assert layout.num_image_tokens((672, 672)) == 2928
  assert layout.num_image_tokens((336, 1008)) == 2328


def test_select_best_resolution_fuzz():
  """Random sizes (tiny to very elongated) and pinpoint lists, in several orders, against transformers."""
  rng = np.random.default_rng(7)
  pinpoint_lists = [V16_PINPOINTS, V16_PINPOINTS[::-1], [[336, 336], [336, 336 * 2], [336 * 2, 336]]]
  pinpoint_lists += [(rng.integers(1, 5, (int(rng.integers(2, 7)), 2)) * 14).tolist() for _ in range(20)]
  exact_ties = 0
  for pinpoints in pinpoint_lists:
    for height, width in np.exp(rng.uniform(np.log(14), np.log(3000), (200, 2))).astype(int).tolist():
      expected = hf_select_best_resolution((height, width), pinpoints)
      assert anyres.select_best_resolution((height, width), pinpoints) == tuple(expected), (height, width)
      fits = _shown_and_wasted((height, width), pinpoints)
      exact_ties += fits.count(max(fits, key=lambda fit: (fit[0], -fit[1]))) >= 2
  assert exact_ties >= 10  # the fuzz exercises the first-listed-wins rule


def test_unpad_slices_match_unpad_image():
  rng = np.random.default_rng(3)
  layout = _layout("v1.6")
  grids = [(rows * 24, cols * 24) for rows, cols in layout.grid_pinpoints]
  grids += [tuple(int(v) for v in rng.integers(1, 80, 2)) for _ in range(20)]
  sizes = rng.integers(14, 3000, (40, 2)).tolist() + [[100, 100], [336, 1008], [1000, 3]] + ROUNDING_SIZES["v1.6"]
  for rows, cols in grids:
    features = torch.arange(rows * cols).reshape(1, rows, cols)
    for height, width in sizes:
      row_slice, col_slice = anyres.unpad_slices((height, width), (rows, cols))
      expected = hf_modeling.unpad_image(features, (height, width))
      assert torch.equal(features[:, row_slice, col_slice], expected), (height, width, rows, cols)


def _assert_one_line_error(call, *names):
  with pytest.raises(LlavaJaxError) as excinfo:
    call()
  message = str(excinfo.value)
  assert "\n" not in message
  for name in names:
    assert name in message, (name, message)


def test_bad_images():
  layout, processor = _layout("v1.6"), ImageProcessor.from_config(CONFIGS["v1.6"]["processor"])
  zero_sized = Image.new("RGB", (0, 40))
  _assert_one_line_error(lambda: anyres_pixels(zero_sized, processor, layout, name="a.png"), "a.png", "40x0")
  _assert_one_line_error(lambda: layout.num_image_tokens((40, 0)), "40x0", "zero")
  _assert_one_line_error(lambda: anyres.select_best_resolution((0, 5), V16_PINPOINTS), "0x5")
  small = _random_image(13, 300)
  _assert_one_line_error(lambda: anyres_pixels(small, processor, layout, name="b.png"), "b.png", "13x300", "14x14")
  _assert_one_line_error(lambda: layout.num_image_tokens((300, 13)), "300x13", "14x14")


def test_bad_layouts():
  _assert_one_line_error(lambda: AnyResLayout(336, 14, [[336, 672], [300, 672]]), "image_grid_pinpoints",
                         "[300, 672]", "336")
  _assert_one_line_error(lambda: AnyResLayout(336, 14, [[336, 700]]), "[336, 700]")
  _assert_one_line_error(lambda: AnyResLayout(336, 14, []), "image_grid_pinpoints", "empty")
  _assert_one_line_error(lambda: anyres.select_best_resolution((100, 100), []), "image_grid_pinpoints", "empty")
  _assert_one_line_error(lambda: AnyResLayout(336, 14, [[336]]), "[336]")
  _assert_one_line_error(lambda: AnyResLayout(336, 14, [[336, -336]]), "[336, -336]")
  _assert_one_line_error(lambda: AnyResLayout(336, 14, V16_PINPOINTS, "cls"), "vision_feature_select_strategy",
                         "'cls'")


def test_processor_that_does_not_give_tower_tiles():
  layout, img = _layout("v1.6"), _random_image(400, 500)
  _assert_one_line_error(lambda: anyres_pixels(img, ImageProcessor.default(224), layout), "224", "336x336")
  padded = ImageProcessor.default(336, pad_to_square=True)
  _assert_one_line_error(lambda: anyres_pixels(img, padded, layout), "pad_to_square True")
