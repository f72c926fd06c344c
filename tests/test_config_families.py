"""config.json <-> LlavaConfig for every tower and decoder family, against transformers' own configs."""

import dataclasses

import pytest
import transformers

from hf_fixtures import tiny_hf_config
from llava_jax.config import TEXT_FAMILIES, VISION_FAMILIES, LlavaConfig, TextConfig
from llava_jax.errors import LlavaJaxError
from llava_jax.models.llava import LANGUAGE_MODELS, VISION_TOWERS
from llava_jax.weights.mapping import TEXT_RULES, VISION_RULES

TEXT_CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                "qwen2": transformers.Qwen2Config}
# The text config fields transformers' modules read, under their names in TextConfig.
ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "hidden_act")


def test_every_family_has_a_module_and_mapping_rows():
  assert set(TEXT_FAMILIES) == set(LANGUAGE_MODELS) == set(TEXT_RULES) == set(TEXT_CONFIGS)
  assert set(VISION_FAMILIES) == set(VISION_TOWERS) == set(VISION_RULES) == {"clip_vision_model",
                                                                               "siglip_vision_model"}


@pytest.mark.parametrize("variant", [dict(), dict(text="mistral", sliding_window=24), dict(text="qwen2"),
                                     dict(text="qwen2", tie=True), dict(text="llama3"), dict(text="yi"),
                                     dict(rope_scaling=2.0), dict(vision="siglip", strategy="full"),
                                     dict(vision="siglip", head=False, text="qwen2")], ids=str)
def test_config_json_round_trips_exactly(variant):
  d = tiny_hf_config(**variant).to_dict()
  assert LlavaConfig.from_hf_dict(d).to_hf_dict() == d


def _sparse(text: dict) -> dict:
  vision = {"model_type": "clip_vision_model", "image_size": 28, "patch_size": 7}
  return {"model_type": "llava", "text_config": text, "vision_config": vision}


@pytest.mark.parametrize("model_type", sorted(TEXT_CONFIGS))
def test_keys_a_config_leaves_out_take_transformers_defaults(model_type):
  ours = LlavaConfig.from_hf_dict(_sparse({"model_type": model_type, "num_attention_heads": 8}))
  theirs = TEXT_CONFIGS[model_type](num_attention_heads=8)
  for name in ARCHITECTURE:
    assert getattr(ours.text, name) == getattr(theirs, name), name
  assert ours.text.rope_theta == theirs.rope_parameters["rope_theta"]
  assert ours.text.head_dim == (getattr(theirs, "head_dim", None) or theirs.hidden_size // 8)
  assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
  window = theirs.sliding_window if model_type == "mistral" else None
  assert ours.text.sliding_window == window


def test_family_flags():
  def text(model_type, **keys):
    return LlavaConfig.from_hf_dict(_sparse(dict(model_type=model_type, **keys))).text
  qwen2 = text("qwen2", attention_bias=False, mlp_bias=True, sliding_window=131072, use_sliding_window=False)
  assert (qwen2.qkv_bias, qwen2.o_proj_bias, qwen2.mlp_bias, qwen2.sliding_window) == (True, False, False, None)
  llama = text("llama", attention_bias=True, mlp_bias=True, sliding_window=64)
  assert (llama.qkv_bias, llama.o_proj_bias, llama.mlp_bias, llama.sliding_window) == (True, True, True, None)
  mistral = text("mistral", attention_bias=True)
  assert (mistral.qkv_bias, mistral.o_proj_bias) == (False, False)


def test_v4_rope_keys_read_like_v5():
  v5 = LlavaConfig.from_hf_dict(tiny_hf_config(text="llama3").to_dict())
  d = tiny_hf_config(text="llama3").to_dict()
  rope = d["text_config"].pop("rope_parameters")
  d["text_config"].update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
  v4 = LlavaConfig.from_hf_dict(d)
  assert v4 == v5 and v4.to_hf_dict()["text_config"] == v5.to_hf_dict()["text_config"]


def test_hand_built_qwen2_config_loads_in_transformers():
  """A config.json written from a TextConfig alone (no source file) describes the same Qwen2 to transformers."""
  text = TextConfig(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e6,
                    qkv_bias=True, tie_word_embeddings=True)
  ours = LlavaConfig(text=text).replace(image_seq_length=576)
  theirs = transformers.LlavaConfig(**ours.to_hf_dict()).text_config
  assert isinstance(theirs, transformers.Qwen2Config)
  for name in ARCHITECTURE:
    assert getattr(theirs, name) == getattr(text, name), name
  assert theirs.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
  assert LlavaConfig.from_hf_dict(ours.to_hf_dict()) == ours
  with pytest.raises(LlavaJaxError, match="qkv_bias=True"):
    LlavaConfig(text=dataclasses.replace(text, qkv_bias=False)).to_hf_dict()


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update(model_type="gemma"), "text_config.model_type 'gemma'"),
    (lambda t: t.update(use_sliding_window=True, max_window_layers=1, layer_types=None), "use_sliding_window True"),
    (lambda t: t.update(use_sliding_window=True, layer_types=["full_attention", "sliding_attention"]),
     "use_sliding_window True"),
    (lambda t: t.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "'yarn'"),
    (lambda t: t["rope_parameters"].pop("low_freq_factor"), "lack low_freq_factor"),
], ids=["model_type", "qwen2_sliding_layers", "qwen2_layer_types", "rope_type", "llama3_key"])
def test_unsupported_text_configs_name_file_and_value(edit, message):
  d = tiny_hf_config(text="qwen2" if "sliding" in message else "llama3").to_dict()
  edit(d["text_config"])
  with pytest.raises(LlavaJaxError, match=f"^m/config.json: .*{message}"):
    LlavaConfig.from_hf_dict(d, source="m/config.json")
