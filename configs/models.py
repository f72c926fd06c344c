"""Model architectures by name, as Hugging Face config.json dicts (the llava-hf hub values).

`get(name)` gives the LlavaConfig; `hf_dict(name)` the config.json contents (a fresh copy), e.g.
for `transformers.LlavaConfig(**hf_dict("llava-1.5-7b"))`. Every architecture value is written
out rather than left to library defaults, so the numbers here are the whole truth.
"""

from __future__ import annotations

import copy

from llava_jax.config import LlavaConfig
from llava_jax.errors import LlavaJaxError

# CLIP ViT-L/14 at 336 px, as used by every LLaVA-1.5 model.
_CLIP_L14_336 = {
    "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 336, "patch_size": 14, "projection_dim": 768,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}


def _vicuna(hidden: int, intermediate: int, layers: int, heads: int, name: str) -> dict:
  return {
      "_name_or_path": name, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32064,
      "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
      "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 4096,
      "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
      "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
  }


def _llava(text: dict, vision: dict, image_token_index: int, pad_token_id: int) -> dict:
  return {
      "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "ignore_index": -100,
      "image_token_index": image_token_index, "pad_token_id": pad_token_id, "projector_hidden_act": "gelu",
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
      "image_seq_length": (vision["image_size"] // vision["patch_size"]) ** 2,
      "tie_word_embeddings": False, "text_config": text, "vision_config": vision,
  }


MODELS = {
    "llava-1.5-7b": _llava(_vicuna(4096, 11008, 32, 32, "lmsys/vicuna-7b-v1.5"), _CLIP_L14_336, 32000, 32001),
    "llava-1.5-13b": _llava(_vicuna(5120, 13824, 40, 40, "lmsys/vicuna-13b-v1.5"), _CLIP_L14_336, 32000, 32001),
    # Every structural feature of the 7b at toy size: runs in milliseconds on a CPU.
    "tiny": _llava(
        {"model_type": "llama", "vocab_size": 128, "hidden_size": 48, "intermediate_size": 80,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_channels": 3, "image_size": 28, "patch_size": 7, "projection_dim": 16,
         "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        image_token_index=127, pad_token_id=0),
}
# LLaVA-NeXT at toy size: tiny's towers, AnyRes over its 28-px tiles (1x2, 2x1, 2x2, 1x3 and 3x1 tiles).
MODELS["tiny-next"] = dict(copy.deepcopy(MODELS["tiny"]), architectures=["LlavaNextForConditionalGeneration"],
                           model_type="llava_next",
                           image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]])
ALIASES = {"7b": "llava-1.5-7b", "13b": "llava-1.5-13b"}


def hf_dict(name: str) -> dict:
  name = ALIASES.get(name, name)
  if name not in MODELS:
    raise LlavaJaxError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS) + sorted(ALIASES))})")
  return copy.deepcopy(MODELS[name])


def get(name: str) -> LlavaConfig:
  return LlavaConfig.from_hf_dict(hf_dict(name), source=f"configs/models.py:{name}")
