"""`llava-to-hf` on an original lmms-lab LLaVA-OneVision release: a tiny one built from transformers' OneVision
test model by the inverse of transformers' convert_llava_onevision_weights_to_hf.py key renames (Qwen2 tensors,
`model.mm_projector.0/2`, `model.image_newline`, the SigLIP tower embedded without its last layer) becomes a
`llava_onevision` folder that transformers loads with no missing or unexpected keys and the reference's logits;
bad releases exit 2 with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from hf_fixtures import IMAGE_TOKEN, hf_state
from llava_jax import cli
from llava_jax.config import load_config
from llava_jax.weights import convert
from test_onevision import LARGE, PINPOINTS, _image, reference_image_processor, tiny_hf_onevision_model

ORIG_VOCAB = 126  # + <image> and <video>: the 128 rows of the tiny model
EMBEDDED = "model.vision_tower.vision_tower.vision_model."


def _original_name(name: str) -> str:
  """The HF name's original lmms-lab name (transformers' KEYS_TO_MODIFY_MAPPING backwards)."""
  for hf_prefix, original in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                              ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                              ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                              ("image_newline", "model.image_newline"), ("vision_tower.", EMBEDDED)):
    if name.startswith(hf_prefix):
      return original + name[len(hf_prefix):]
  raise AssertionError(name)


def _release(root, reference, **config_changes):
  """An original OneVision folder (Qwen2-style tokenizer with its <|endoftext|> pad) from `reference`'s weights, and
  the SigLIP tower's folder (its config only: the release embeds the tensors, all but the last layer's)."""
  text, vision = reference.config.text_config, reference.config.vision_config
  tensors = {_original_name(k): v for k, v in hf_state(reference).items()}
  for name in ("model.embed_tokens.weight", "lm_head.weight"):
    tensors[name] = np.ascontiguousarray(tensors[name][:ORIG_VOCAB])
  orig, tower = root / "orig", root / "siglip"
  orig.mkdir()
  tower.mkdir()
  save_file(tensors, str(orig / "model.safetensors"))
  config = {
      "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "vocab_size": ORIG_VOCAB,
      "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
      "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
      "num_key_value_heads": text.num_key_value_heads, "rms_norm_eps": text.rms_norm_eps,
      "max_position_embeddings": text.max_position_embeddings, "rope_theta": text.rope_parameters["rope_theta"],
      "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
      "max_window_layers": text.num_hidden_layers, "sliding_window": 4096, "use_sliding_window": False,
      "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": vision.hidden_size,
      "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
      "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres_max_2", "image_grid_pinpoints": PINPOINTS,
      "mm_spatial_pool_mode": "bilinear", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
  }
  config.update(config_changes)
  (orig / "config.json").write_text(json.dumps(config))
  words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(ORIG_VOCAB - 3)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>").save_pretrained(orig)
  full_tower = dict(vision.to_dict(), model_type="siglip_vision_model",
                    num_hidden_layers=vision.num_hidden_layers + 1, vision_use_head=True)
  (tower / "config.json").write_text(json.dumps(full_tower))
  return orig, tower


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("ov_release")
  reference = tiny_hf_onevision_model()
  orig, tower = _release(root, reference)
  out = root / "out"
  convert.llava_to_hf(str(orig), str(out), vision_tower=str(tower))
  return reference, orig, out


def test_release_converts_to_the_onevision_folder_transformers_loads(converted):
  reference, _, out = converted
  model, info = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
  config = json.loads((out / "config.json").read_text())
  assert (config["model_type"], config["vision_aspect_ratio"], config["image_grid_pinpoints"]) == (
      "llava_onevision", "anyres_max_2", PINPOINTS)
  assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-1, "full")
  assert config["text_config"]["model_type"] == "qwen2" and config["vision_config"]["num_hidden_layers"] == 3
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>")] + [tokenizer.pad_token_id]
  assert ids == [ORIG_VOCAB, ORIG_VOCAB + 1, 0]
  assert (model.config.image_token_index, model.config.video_token_index) == tuple(ids[:2])
  assert transformers.LlavaOnevisionImageProcessor.from_pretrained(out).image_grid_pinpoints == PINPOINTS
  assert load_config(str(out)).anyres_max_tiles == 2

  # The new rows (<image>, <video>) are each matrix's mean row; the others are the release's.
  state = model.state_dict()
  for ours, theirs in ((state["model.language_model.embed_tokens.weight"],
                        reference.model.language_model.embed_tokens.weight), (state["lm_head.weight"],
                                                                               reference.lm_head.weight)):
    assert torch.equal(ours[:ORIG_VOCAB], theirs[:ORIG_VOCAB])
    np.testing.assert_array_equal(ours[ORIG_VOCAB:].numpy(),
                                  np.tile(theirs[:ORIG_VOCAB].detach().numpy().mean(axis=0), (2, 1)))

  # Logits of a prompt with a downscaled image: the reference's over the release's vocabulary.
  picture = reference_image_processor()([[_image(LARGE)]], return_tensors="pt")
  rng = np.random.default_rng(0)
  tokens = 16 + 6 * 6  # the large image's tokens under anyres_max_2 (tests/test_onevision.py)
  ids = np.concatenate([rng.integers(3, ORIG_VOCAB, 5), np.full(tokens, -1), rng.integers(3, ORIG_VOCAB, 4)])
  run = lambda m, image_id: m.eval()(input_ids=torch.from_numpy(np.where(ids < 0, image_id, ids)[None]),
                                     pixel_values=picture["pixel_values"], image_sizes=picture["image_sizes"]).logits
  with torch.no_grad():
    want, got = run(reference, IMAGE_TOKEN)[..., :ORIG_VOCAB], run(model, ORIG_VOCAB)[..., :ORIG_VOCAB]
  assert np.abs(want.numpy()).max() > 1.0
  np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("change,message", [
    ({"mm_spatial_pool_mode": "average"}, "mm_spatial_pool_mode 'average' is not supported"),
    ({"image_aspect_ratio": "anyres_max_x"}, "vision_aspect_ratio 'anyres_max_x' is not anyres_max_N"),
    ({"mm_vision_tower": "google/siglip-base-patch16-224"}, "mm_vision_tower 'google/siglip-base-patch16-224' is "
                                                            "not a local folder"),
    # A tower known by name (no folder needed) is so400m's: not the tiny release's.
    ({"mm_vision_tower": "google/siglip-so400m-patch14-384"},
     "image_grid_pinpoints entry [28, 28] is not a multiple of the vision tower's image_size 384"),
])
def test_bad_release_exits_2_with_one_line(tmp_path, capsys, change, message):
  orig, tower = _release(tmp_path, tiny_hf_onevision_model(), **change)
  argv = ["convert", "llava-to-hf", str(orig), str(tmp_path / "out")]
  capsys.readouterr()  # what building the release printed
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv + ([] if "mm_vision_tower" in change else ["--vision-tower", str(tower)]))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err
  assert not (tmp_path / "out").exists()
