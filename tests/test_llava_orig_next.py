"""`llava-to-hf` on original LLaVA-NeXT (llava-v1.6) release folders: a hand-built release (LLaMA- or
Mistral-style safetensors with `model.mm_projector.*` and `model.image_newline`, a separate CLIP folder)
becomes a `llava_next` folder that transformers loads with no missing or unexpected keys, whose tensors are the
release's, and that our model runs to transformers' logits; bad releases exit 2 with one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from hf_fixtures import NEXT_IMAGE_SIZE, NEXT_PINPOINTS, hf_state, tiny_hf_next_model
from llava_jax.data.layouts import layout_for
from llava_jax.data.processor import Processor
from llava_jax.infer.generate import Engine, Prompt
from llava_jax.weights import convert, model_folder
from test_convert import _read_folder

ORIG_VOCAB = 120  # + <image> (+ <pad>), padded to 64: the 128 rows of the tiny models
CLIP_PREPROCESSOR = {"crop_size": NEXT_IMAGE_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                     "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": NEXT_IMAGE_SIZE,
                     "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711]}
# vicuna: the tokenizer has a pad token (<unk>), so only <image> is added (as transformers does for Vicuna and Yi);
# mistral: it has none, so <pad> is added too.
VARIANTS = {"vicuna": dict(text="llama", model_type="llava_llama", pad="<unk>"),
            "mistral": dict(text="mistral", model_type="llava_mistral", pad=None)}


def _original_tensors(state: dict) -> dict:
  """The original release's LLM + projector + newline tensors, named as haotian-liu's LLaVA saves them."""
  tensors = {}
  for name, value in state.items():
    if name.startswith("language_model.model."):
      tensors["model." + name[len("language_model.model."):]] = value
    elif name == "language_model.lm_head.weight":
      tensors["lm_head.weight"] = value
    elif name.startswith("multi_modal_projector.linear_"):
      index = {"1": "0", "2": "2"}[name[len("multi_modal_projector.linear_")]]
      tensors[f"model.mm_projector.{index}." + name.rsplit(".", 1)[1]] = value
    elif name == "image_newline":
      tensors["model.image_newline"] = value
  for name in ("model.embed_tokens.weight", "lm_head.weight"):
    tensors[name] = np.ascontiguousarray(tensors[name][:ORIG_VOCAB])
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(6, np.float32)  # old exports carry it
  return tensors


def _release(root, reference, variant: dict, **config_changes):
  """Hand-builds an original llava-v1.6 folder (with a tokenizer) and its CLIP folder from `reference`'s weights."""
  state = hf_state(reference)
  cfg, text = reference.config, reference.config.text_config
  orig, clip = root / "orig", root / "clip"
  orig.mkdir()
  clip.mkdir()
  save_file(_original_tensors(state), str(orig / "model.safetensors"))
  config = {
      "architectures": ["LlavaLlamaForCausalLM"], "model_type": variant["model_type"], "vocab_size": ORIG_VOCAB,
      "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
      "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
      "num_key_value_heads": text.num_key_value_heads, "rms_norm_eps": text.rms_norm_eps,
      "max_position_embeddings": text.max_position_embeddings, "rope_theta": text.rope_parameters["rope_theta"],
      "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
      "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": cfg.vision_config.hidden_size,
      "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
      "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres", "image_grid_pinpoints": NEXT_PINPOINTS,
      "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
  }
  if variant["text"] == "mistral":
    config["sliding_window"] = None
  config.update(config_changes)
  (orig / "config.json").write_text(json.dumps(config))

  words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(ORIG_VOCAB - 3)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token=variant["pad"]).save_pretrained(orig)

  save_file({"vision_model." + k[len("vision_tower."):]: v for k, v in state.items() if k.startswith("vision_tower.")},
            str(clip / "model.safetensors"))
  vision = cfg.vision_config.to_dict()
  vision["model_type"] = "clip_vision_model"
  (clip / "config.json").write_text(json.dumps(vision))
  (clip / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR))
  return orig, clip


def _image(size, seed):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_v16_release_converts_to_the_llava_next_folder_transformers_loads(tmp_path, name):
  variant = VARIANTS[name]
  reference = tiny_hf_next_model(seed=5, text=variant["text"])  # its image token id plays no part here
  orig, clip = _release(tmp_path, reference, variant)
  out = tmp_path / "out"
  convert.llava_to_hf(str(orig), str(out), vision_tower=str(clip))

  model, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
  model.eval()
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == "llava_next" and config["image_grid_pinpoints"] == NEXT_PINPOINTS
  assert config["use_image_newline_parameter"] is True
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  image_id, pad_id = ORIG_VOCAB, (0 if variant["pad"] else ORIG_VOCAB + 1)
  assert (tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id) == (image_id, pad_id)
  assert (model.config.image_token_index, model.config.text_config.vocab_size) == (image_id, 128)

  # Every tensor is the release's: the reference the release was cut from, except the added vocabulary rows,
  # which are the mean of the release's rows (to float32 rounding: the summation order differs).
  original = _read_folder(orig)
  np.testing.assert_array_equal(_read_folder(out)["image_newline"], original["model.image_newline"])
  converted = model.state_dict()
  for name, value in reference.state_dict().items():
    if name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
      assert torch.equal(converted[name][:ORIG_VOCAB], value[:ORIG_VOCAB]), name
      torch.testing.assert_close(converted[name][ORIG_VOCAB:], value[:ORIG_VOCAB].mean(0).expand(8, -1),
                                 rtol=1e-5, atol=1e-7)
    else:
      assert torch.equal(converted[name], value), name

  # transformers' processor from the written files, and our model and processor from the same folder.
  processor = transformers.AutoProcessor.from_pretrained(out)
  assert isinstance(processor, transformers.LlavaNextProcessor)
  assert processor.image_processor.image_grid_pinpoints == NEXT_PINPOINTS
  text, images = "w5 <image> w7 <image> w9", [_image((30, 80), 0), _image((90, 25), 1)]
  inputs = processor(text=text, images=images, return_tensors="pt")
  loaded = model_folder.load_model(str(out))
  ours = Processor.from_folder(out, layout_for(loaded.config))
  prompt = Prompt.of(ours.prepare(text, images, raw=True))
  np.testing.assert_array_equal(prompt.input_ids, inputs["input_ids"][0].numpy())
  logits, mask = Engine(loaded.config, loaded.params, eos_token_ids=[], pad_token_id=pad_id).forward([prompt])
  with torch.no_grad():
    want = model(**inputs).logits[0].numpy()
  got = logits[0][mask[0]]
  assert np.abs(want).max() > 1.0
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.parametrize("changes,message", [
    (dict(image_grid_pinpoints=[[28, 56], [42, 28]]),
     r"config.json: image_grid_pinpoints entry \[42, 28\] is not a multiple of the vision tower's image_size 28"),
    (dict(mm_patch_merge_type="spatial"), r"config.json: mm_patch_merge_type 'spatial' is not supported"),
    (dict(image_aspect_ratio="pad"),
     r"image_aspect_ratio 'pad' does not go with mm_patch_merge_type 'spatial_unpad' \(expected 'anyres'\)"),
    (dict(mm_patch_merge_type="flat"),
     r"image_aspect_ratio 'anyres' does not go with mm_patch_merge_type 'flat' \(expected not AnyRes\)"),
], ids=["pinpoints", "merge_type", "aspect_ratio", "anyres_flat"])
def test_bad_v16_release_exits_2_with_one_line(tmp_path, changes, message):
  orig, clip = _release(tmp_path, tiny_hf_next_model(), VARIANTS["vicuna"], **changes)
  argv = ["convert", "llava-to-hf", str(orig), str(tmp_path / "out"), "--vision-tower", str(clip)]
  result = subprocess.run([sys.executable, "-m", "llava_jax", *argv], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("llava-jax: error: " + str(orig / "config.json")), result.stderr
  assert re.search(message, lines[0]), lines[0]
  assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]  # nor a temporary sibling
