"""LLaVA-NeXT (model_type llava_next) against transformers' LlavaNextForConditionalGeneration, LlavaNextProcessor
and LlavaNextImageProcessorPil, built in-process: config, the per-token feature index, prompt ids and tiles,
logits and greedy generations of left-padded batches mixing image sizes and counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from hf_fixtures import (IMAGE_TOKEN, NEXT_PINPOINTS, hf_state, next_image_processor, tiny_hf_next_config,
                         tiny_hf_next_model)
from llava_jax.config import LlavaConfig, load_config
from llava_jax.data.anyres import NEWLINE
from llava_jax.data.layouts import layout_for
from llava_jax.data.processor import Processor
from llava_jax.errors import LlavaJaxError
from llava_jax.infer.generate import Engine, Prompt
from llava_jax.weights.mapping import hf_to_params
from tokenizer_fixture import build_tiny_tokenizer

NEW_TOKENS = 20
PAD = 0
TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# (height, width): square, wide, tall, and sizes whose unpadding crops rows or columns of the grid.
SQUARE, WIDE, TALL = (40, 40), (30, 80), (90, 25)
# Each row of the batch: its images; the two-image row mixes a wide and a tall image.
ROWS = [[SQUARE], [WIDE], [TALL], [WIDE, TALL]]
VARIANTS = {"vicuna_mha": dict(), "mistral_gqa": dict(text="mistral"), "qwen2_biases": dict(text="qwen2"),
            "llama3_rope_scaling": dict(text="llama3")}


def _image(size, seed=0):
  return Image.fromarray(np.random.default_rng(seed + size[0] * 1000 + size[1]).integers(
      0, 256, size + (3,), dtype=np.uint8))


def _config(hf_model) -> LlavaConfig:
  return LlavaConfig.from_hf_dict(hf_model.config.to_dict())


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_json_round_trips_exactly(variant):
  d = tiny_hf_next_config(**VARIANTS[variant]).to_dict()
  config = LlavaConfig.from_hf_dict(d)
  assert (config.model_type, config.image_grid_pinpoints) == ("llava_next", tuple(map(tuple, NEXT_PINPOINTS)))
  assert config.to_hf_dict() == d


def test_bad_configs_name_file_and_value(tmp_path):
  d = tiny_hf_next_config().to_dict()
  d["image_grid_pinpoints"] = [[28, 56], [42, 28]]
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(LlavaJaxError, match=r"config.json: image_grid_pinpoints entry \[42, 28\] is not a multiple "
                                          r"of the vision tower's image_size 28"):
    load_config(str(tmp_path))
  d["model_type"] = "paligemma"
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(LlavaJaxError, match="config.json: unsupported model_type 'paligemma'"):
    load_config(str(tmp_path))


@pytest.mark.parametrize("vision, strategy, message", [
    ("clip", "full", "'full' keeps the clip_vision_model class token"),
    ("siglip", "default", "'default' drops the first token, and siglip_vision_model has no class token")])
def test_a_strategy_that_leaves_more_or_less_than_the_patches_is_refused_as_transformers_fails_on_it(
    vision, strategy, message):
  hf_model = tiny_hf_next_model(vision=vision, strategy=strategy)
  pixels = torch.from_numpy(next_image_processor()([_image(SQUARE)], return_tensors="np")["pixel_values"])
  with pytest.raises(RuntimeError):
    hf_model.model.get_image_features(pixels, torch.tensor([SQUARE]))
  with pytest.raises(LlavaJaxError, match=message):
    _config(hf_model)


# ---- the feature index -------------------------------------------------------------------------


_rng = np.random.default_rng(7)
INDEX_SIZES = [SQUARE, WIDE, TALL, (28, 28), (7, 200), (200, 7), (55, 176)] + [
    (int(h), int(w)) for h, w in _rng.integers(7, 400, (20, 2))]


@pytest.fixture(scope="module")
def default_model():
  return tiny_hf_next_model()


@pytest.mark.parametrize("size", INDEX_SIZES)
def test_feature_index_is_pack_image_features(default_model, size):
  """Features numbered by their position (tile * per_tile + token) go through transformers' pack_image_features;
  what comes out, position by position, is our index (the newline embedding set to NEWLINE)."""
  hf_model = default_model
  layout = layout_for(_config(hf_model))
  tiles, per_tile = layout.tiles(size), layout.tokens_per_tile
  numbered = torch.arange(tiles * per_tile, dtype=torch.float32).reshape(tiles, per_tile, 1)
  packed, lens = hf_model.model.pack_image_features([numbered], torch.tensor([size]), "default",
                                                    image_newline=torch.tensor([float(NEWLINE)]))
  index = layout.feature_index(size)
  assert int(lens[0]) == len(index) == layout.num_image_tokens(size)
  np.testing.assert_array_equal(packed[0][:, 0].numpy().astype(np.int32), index)


# ---- processor, model and engine against transformers ------------------------------------------


def _folder(path, **processor_settings):
  """A complete LLaVA-NeXT folder as transformers writes it: weights, tokenizer, processor files, template."""
  tokenizer = build_tiny_tokenizer(path)
  reference_processor(tokenizer, **processor_settings).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _folder(tmp_path_factory.mktemp("next"))


def reference_processor(tokenizer, vision_feature_select_strategy="default", num_additional_image_tokens=1):
  """The processor of a CLIP tower ("default": its class token dropped); SigLIP's: "full", no additional token."""
  return transformers.LlavaNextProcessor(image_processor=next_image_processor(), tokenizer=tokenizer, patch_size=7,
                                         vision_feature_select_strategy=vision_feature_select_strategy,
                                         num_additional_image_tokens=num_additional_image_tokens,
                                         chat_template=TEMPLATE)


def _reference_batch(processor, rows):
  """transformers' inputs for the rows (left padded): the chat template's prompts, the images of all rows."""
  texts = [processor.apply_chat_template(
      [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": "What is it?"}]}],
      add_generation_prompt=True) for images in rows]
  processor.tokenizer.padding_side = "left"
  return processor(text=texts, images=[_image(s, i) for images in rows for i, s in enumerate(images)],
                   padding=True, return_tensors="pt")


def _our_prompts(processor: Processor, rows):
  return [Prompt.of(processor.prepare("What is it?", [_image(s, i) for i, s in enumerate(images)]))
          for images in rows]


@pytest.fixture(scope="module")
def processors(folder):
  reference = reference_processor(transformers.AutoTokenizer.from_pretrained(str(folder)))
  ours = Processor.from_folder(folder, layout_for(_config(tiny_hf_next_model())))
  return reference, ours


def test_prompt_ids_and_tiles_equal_llava_next_processor(processors):
  reference, ours = processors
  expected = _reference_batch(reference, ROWS)
  prompts = _our_prompts(ours, ROWS)
  images = iter(range(len(expected["image_sizes"])))
  for row, prompt in enumerate(prompts):
    ids = expected["input_ids"][row][expected["attention_mask"][row].bool()].numpy()
    np.testing.assert_array_equal(prompt.input_ids, ids)
    tiles = [expected["pixel_values"][next(images)] for _ in ROWS[row]]
    counts = [ours.layout.tiles(size) for size in ROWS[row]]
    reference_tiles = np.concatenate([t[:n].numpy() for t, n in zip(tiles, counts)]).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(prompt.pixel_values, reference_tiles)
  assert len({len(p.input_ids) for p in prompts}) == len(ROWS)  # every row its own image-token count


def _engine(hf_model):
  config = _config(hf_model)
  return Engine(config, hf_to_params(hf_state(hf_model).__getitem__, config), eos_token_ids=[], pad_token_id=PAD)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_generations_equal_transformers(processors, variant):
  _assert_logits_and_generations_equal(*processors, tiny_hf_next_model(seed=1, **VARIANTS[variant]))


def test_siglip_tower_with_every_patch_equals_transformers(tmp_path):
  """The "full" strategy (every tower output a feature) that AnyRes allows only with a tower without a class
  token, as OneVision's SigLIP; each side's processor for it."""
  hf_model = tiny_hf_next_model(seed=1, vision="siglip", strategy="full")
  path = _folder(tmp_path, vision_feature_select_strategy="full", num_additional_image_tokens=0)
  reference = reference_processor(transformers.AutoTokenizer.from_pretrained(str(path)), "full", 0)
  _assert_logits_and_generations_equal(reference, Processor.from_folder(path, layout_for(_config(hf_model))), hf_model)


def _assert_logits_and_generations_equal(reference, ours, hf_model):
  """One left-padded batch: a square, a wide and a tall image, and a row with two images of different sizes."""
  hf_model.generation_config.eos_token_id = None  # random weights: all 20 tokens are produced
  engine = _engine(hf_model)
  inputs = _reference_batch(reference, ROWS)
  prompts = _our_prompts(ours, ROWS)

  logits, mask = engine.forward(prompts)
  with torch.no_grad():
    ref = hf_model(**inputs).logits.numpy()
    generated = hf_model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
  width = inputs["input_ids"].shape[1]
  for row in range(len(ROWS)):
    n = int(mask[row].sum())
    want = ref[row, width - n:]
    got = logits[row][mask[row]]
    assert np.abs(want).max() > 1.0
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, row
  ours_generated = engine.generate(prompts, NEW_TOKENS)
  for row in range(len(ROWS)):
    np.testing.assert_array_equal(ours_generated[row].tokens, generated[row, width:].numpy())


def test_bad_prompts(processors):
  _, ours = processors
  with pytest.raises(LlavaJaxError, match=r"image 1: image is 5x40 \(height x width\) pixels, smaller than one 7x7"):
    ours.prepare("What?", [_image((5, 40))])
  with pytest.raises(LlavaJaxError, match=r"prompt has 2 <image> tag\(s\) but 1 image\(s\)"):
    ours.prepare("<image> <image>", [_image(SQUARE)], raw=True)
  engine = _engine(tiny_hf_next_model())
  prompt = Prompt.of(ours.prepare("What?", [_image(WIDE)]))
  with pytest.raises(LlavaJaxError, match="a llava_next model needs the image_feature_index"):
    engine.generate([Prompt(prompt.input_ids, prompt.pixel_values)], 2)
  with pytest.raises(LlavaJaxError, match="image_feature_index outside the"):
    engine.generate([Prompt(prompt.input_ids, prompt.pixel_values[:1], prompt.image_feature_index)], 2)


def test_processor_files_must_agree_with_the_model(folder, tmp_path):
  import shutil
  layout = layout_for(_config(tiny_hf_next_model()))
  shutil.copytree(folder, tmp_path / "m")
  path = tmp_path / "m" / "processor_config.json"
  d = json.loads(path.read_text())
  path.write_text(json.dumps(dict(d, num_additional_image_tokens=0)))
  with pytest.raises(LlavaJaxError, match="processor_config.json: num_additional_image_tokens is 0 but the model"):
    Processor.from_folder(tmp_path / "m", layout)
  d["image_processor"]["image_grid_pinpoints"] = [[28, 56]]
  path.write_text(json.dumps(d))
  with pytest.raises(LlavaJaxError, match=r"image_grid_pinpoints \[\[28, 56\]\] differ from the model's"):
    Processor.from_folder(tmp_path / "m", layout)
