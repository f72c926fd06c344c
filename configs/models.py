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


def _text(name: str, model_type: str, vocab: int, hidden: int, intermediate: int, layers: int, heads: int,
          kv_heads: int, max_positions: int, rms_norm_eps: float, rope_theta: float, bos: int, eos: int,
          pad: int | None, **family) -> dict:
  """A decoder's text_config; `family` holds the keys only its model_type has (Mistral's sliding_window...)."""
  architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
  text = {
      "_name_or_path": name, "architectures": [architecture[model_type]], "model_type": model_type,
      "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
      "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": max_positions,
      "rms_norm_eps": rms_norm_eps, "rope_theta": rope_theta, "hidden_act": "silu", "tie_word_embeddings": False,
      "bos_token_id": bos, "eos_token_id": eos, **family,
  }
  if pad is not None:
    text["pad_token_id"] = pad
  return text


def _vicuna(hidden: int, intermediate: int, layers: int, heads: int, name: str) -> dict:
  return _text(name, "llama", 32064, hidden, intermediate, layers, heads, heads, 4096, 1e-5, 10000.0, 1, 2, 0)


def _llava(text: dict, vision: dict, image_token_index: int, pad_token_id: int | None,
           grid_pinpoints: list | None = None) -> dict:
  """A LLaVA-1.5 config.json, or with `grid_pinpoints` a LLaVA-NeXT (llava_next, AnyRes) one."""
  next_ = grid_pinpoints is not None
  d = {
      "architectures": ["LlavaNextForConditionalGeneration" if next_ else "LlavaForConditionalGeneration"],
      "model_type": "llava_next" if next_ else "llava", "ignore_index": -100,
      "image_token_index": image_token_index, "projector_hidden_act": "gelu",
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
      "image_seq_length": (vision["image_size"] // vision["patch_size"]) ** 2,
      "tie_word_embeddings": False, "text_config": text, "vision_config": vision,
  }
  if pad_token_id is not None:
    d["pad_token_id"] = pad_token_id
  if next_:
    d["image_grid_pinpoints"] = grid_pinpoints
  return d


# LLaVA-NeXT's AnyRes resolutions (height, width): 2x1, 1x2, 2x2, 3x1 and 1x3 tiles of 336 px.
_V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _next(text: dict, image_token_index: int) -> dict:
  """A released LLaVA-NeXT model: CLIP ViT-L/14-336, v1.6's pinpoints; no top-level pad_token_id on the hub."""
  return _llava(text, _CLIP_L14_336, image_token_index, None, _V16_PINPOINTS)


# SigLIP so400m-patch14-384 without its last layer and head, as every LLaVA-OneVision model uses it.
_SIGLIP_SO400M_26 = {
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 384, "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": False,
}
# OneVision's AnyRes resolutions: 1 to 6 tiles of 384 px each way.
_OV_PINPOINTS = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]


def _qwen2(name: str, vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
           tie: bool) -> dict:
  """A Qwen2 instruct decoder as LLaVA-OneVision ships it: <|endoftext|> / <|im_end|>, no sliding window."""
  return _text(name, "qwen2", vocab, hidden, intermediate, layers, heads, kv_heads, 32768, 1e-6, 1e6, 151643, 151645,
               None, tie_word_embeddings=tie, max_window_layers=layers, sliding_window=131072,
               use_sliding_window=False)


def _onevision(text: dict) -> dict:
  """A released LLaVA-OneVision model (llava-hf/<name>-hf): SigLIP's last hidden state, every patch, anyres_max_9.
  The vocabulary is Qwen2's plus <image> and <video>, padded to a multiple of 64 by transformers' converter."""
  return {
      "architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
      "image_token_index": 151646, "video_token_index": 151647, "projector_hidden_act": "gelu",
      "vision_feature_layer": -1, "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9",
      "image_grid_pinpoints": _OV_PINPOINTS, "tie_word_embeddings": text["tie_word_embeddings"],
      "text_config": text, "vision_config": _SIGLIP_SO400M_26,
  }


def _next_video(text: dict) -> dict:
  """LLaVA-NeXT-Video (llava-hf/LLaVA-NeXT-Video-7B-hf): LLaVA-NeXT's CLIP and AnyRes images, <video> (32000) and
  <image> (32001) in Vicuna's vocabulary, each frame's features average-pooled 2x2 before the projector."""
  return dict(_next(text, 32001), architectures=["LlavaNextVideoForConditionalGeneration"],
              model_type="llava_next_video", video_token_index=32000, spatial_pool_mode="average",
              spatial_pool_stride=2, video_seq_length=288)


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
    # LLaVA-NeXT (llava-hf/<name>-hf). Values the hub's text_config leaves to transformers' defaults (the 7b's
    # sizes, the 8b's heads) are written out as those defaults; the base LLM's config.json agrees with them.
    "llava-v1.6-vicuna-7b": _next(_vicuna(4096, 11008, 32, 32, "lmsys/vicuna-7b-v1.5"), 32000),
    "llava-v1.6-vicuna-13b": _next(_vicuna(5120, 13824, 40, 40, "lmsys/vicuna-13b-v1.5"), 32000),
    "llava-v1.6-mistral-7b": _next(
        _text("mistralai/Mistral-7B-Instruct-v0.2", "mistral", 32064, 4096, 14336, 32, 32, 8, 32768, 1e-5, 1e6, 1, 2,
              None, sliding_window=None), 32000),
    # Yi-34B: the LLaMA architecture with GQA (56 heads, 8 kv heads) and rope theta 5e6; <|im_end|> (7) ends turns.
    "llava-v1.6-34b": _next(
        _text("NousResearch/Nous-Hermes-2-Yi-34B", "llama", 64064, 7168, 20480, 60, 56, 8, 4096, 1e-5, 5e6, 1, 7, 0),
        64000),
    # Llama-3 8B: 128256 tokens + <image> and <pad>, padded to 128320 rows; <|eot_id|> (128009) ends turns.
    "llava-next-llama3-8b": _next(
        _text("meta-llama/Meta-Llama-3-8B-Instruct", "llama", 128320, 4096, 14336, 32, 32, 8, 8192, 1e-5, 5e5,
              128000, 128009, None), 128256),
    # Qwen1.5-110B (qwen2 architecture: q/k/v biases). vocab_size is the base Qwen1.5-110B-Chat's (the hub
    # text_config we found was cut off before it); <image> (151646) fits in its padded embedding.
    "llava-next-110b": _next(
        _text("Qwen/Qwen1.5-110B-Chat", "qwen2", 152064, 8192, 49152, 80, 64, 8, 32768, 1e-6, 1e6, 151643, 151645,
              None, max_window_layers=70, sliding_window=32768, use_sliding_window=False), 151646),
    # Qwen1.5-72B (multi-head attention): text_config from the base Qwen1.5-72B-Chat config.json, eos as in
    # llava-hf/llava-next-72b-hf's generation_config.json.
    "llava-next-72b": _next(
        _text("Qwen/Qwen1.5-72B-Chat", "qwen2", 152064, 8192, 24576, 80, 64, 64, 32768, 1e-6, 1e6, 151643, 151645,
              None, max_window_layers=70, sliding_window=32768, use_sliding_window=False), 151646),
    # LLaVA-OneVision over Qwen2-0.5B (tied embeddings), Qwen2-7B and Qwen2-72B instruct.
    "llava-onevision-qwen2-0.5b-ov": _onevision(
        _qwen2("Qwen/Qwen2-0.5B-Instruct", 152000, 896, 4864, 24, 14, 2, tie=True)),
    "llava-onevision-qwen2-7b-ov": _onevision(
        _qwen2("Qwen/Qwen2-7B-Instruct", 152128, 3584, 18944, 28, 28, 4, tie=False)),
    "llava-onevision-qwen2-72b-ov": _onevision(
        _qwen2("Qwen/Qwen2-72B-Instruct", 152128, 8192, 29568, 80, 64, 8, tie=False)),
    "llava-next-video-7b": _next_video(_vicuna(4096, 11008, 32, 32, "lmsys/vicuna-7b-v1.5")),
}
# LLaVA-NeXT at toy size: tiny's towers, AnyRes over its 28-px tiles (1x2, 2x1, 2x2, 1x3 and 3x1 tiles).
MODELS["tiny-next"] = dict(copy.deepcopy(MODELS["tiny"]), architectures=["LlavaNextForConditionalGeneration"],
                           model_type="llava_next",
                           image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]])
# LLaVA-OneVision at toy size: a 3-layer SigLIP tower (no head) of 28-px tiles, tiny's decoder as Qwen2 (grouped-query,
# q/k/v biases), 1 to 3 tiles each way and anyres_max_2, so that a 3x3-tile image is downscaled.
MODELS["tiny-ov"] = dict(
    _onevision(_text("tiny-qwen2", "qwen2", 128, 48, 80, 2, 4, 2, 512, 1e-6, 1e6, 1, 2, 0, tie_word_embeddings=False)),
    image_token_index=127, video_token_index=126, vision_aspect_ratio="anyres_max_2",
    image_grid_pinpoints=[[28 * rows, 28 * cols] for rows in range(1, 4) for cols in range(1, 4)],
    vision_config=dict(_SIGLIP_SO400M_26, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, image_size=28, patch_size=7))
ALIASES = {"7b": "llava-1.5-7b", "13b": "llava-1.5-13b"}


def hf_dict(name: str) -> dict:
  name = ALIASES.get(name, name)
  if name not in MODELS:
    raise LlavaJaxError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS) + sorted(ALIASES))})")
  return copy.deepcopy(MODELS[name])


def get(name: str) -> LlavaConfig:
  return LlavaConfig.from_hf_dict(hf_dict(name), source=f"configs/models.py:{name}")
