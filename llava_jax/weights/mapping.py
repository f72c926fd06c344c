"""The one table between Hugging Face LLaVA tensor names and llava-jax parameter paths.

Both directions read `rules(config)`: each rule names an HF tensor (with `{i}` for the layer
index when the parameter is stacked on a leading `layers` axis), our parameter path, and a
transform (transpose, head reshape, conv layout). Everything here is numpy and streams one
tensor at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.errors import LlavaJaxError

# ---- transforms: (HF array, our per-layer shape) -> ours, and ours -> HF ----------------------


def _linear_in(w, shape):  # (out, in) -> (in, *out)
  return w.T.reshape(shape)


def _linear_in_back(p):
  return p.reshape(p.shape[0], -1).T


def _linear_out(w, shape):  # (out, heads*head_dim) -> (heads, head_dim, out)
  return w.T.reshape(shape)


def _linear_out_back(p):
  return p.reshape(-1, p.shape[-1]).T


TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda w, shape: w.reshape(shape), lambda p: p),
    "linear": (_linear_in, _linear_in_back),
    "linear_out": (_linear_out, _linear_out_back),
    "bias_heads": (lambda w, shape: w.reshape(shape), lambda p: p.reshape(-1)),
    "conv": (lambda w, shape: w.transpose(2, 3, 1, 0), lambda p: p.transpose(3, 2, 0, 1)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str  # canonical HF name; "{i}" marks a stacked per-layer tensor
  path: str  # our parameter path, "/"-separated
  transform: str
  shape: tuple[int, ...]  # our per-layer shape

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf


def _add(out: list[Rule]) -> Callable:
  return lambda hf, path, transform, shape: out.append(Rule(hf, path, transform, tuple(shape)))


def _layer_norm_rules(add: Callable, hf: str, path: str, size: int) -> None:
  add(hf + ".weight", path + "/scale", "copy", (size,))
  add(hf + ".bias", path + "/bias", "copy", (size,))


def _mlp_rules(add: Callable, hf: str, path: str, v: VisionConfig) -> None:
  for fc, fan_in, fan_out in (("fc1", v.hidden_size, v.intermediate_size), ("fc2", v.intermediate_size, v.hidden_size)):
    add(f"{hf}.{fc}.weight", f"{path}/{fc}/kernel", "linear", (fan_in, fan_out))
    add(f"{hf}.{fc}.bias", f"{path}/{fc}/bias", "copy", (fan_out,))


def _vit_rules(v: VisionConfig, patch_bias: bool) -> list[Rule]:
  """The ViT models/clip.py builds for both towers: embeddings (class token where the family has one) and layers."""
  out: list[Rule] = []
  add, vh = _add(out), (v.num_attention_heads, v.head_dim)
  vt, vl = "vision_tower.", "vision_tower.encoder.layers.{i}."
  add(vt + "embeddings.patch_embedding.weight", "vision_tower/embeddings/patch_embedding/kernel", "conv",
      (v.patch_size, v.patch_size, v.num_channels, v.hidden_size))
  if patch_bias:
    add(vt + "embeddings.patch_embedding.bias", "vision_tower/embeddings/patch_embedding/bias", "copy",
        (v.hidden_size,))
  if v.class_tokens:
    add(vt + "embeddings.class_embedding", "vision_tower/embeddings/class_embedding", "copy", (v.hidden_size,))
  add(vt + "embeddings.position_embedding.weight", "vision_tower/embeddings/position_embedding/embedding", "copy",
      (v.num_patches + v.class_tokens, v.hidden_size))
  for norm in ("layer_norm1", "layer_norm2"):
    _layer_norm_rules(add, vl + norm, f"vision_tower/layers/{norm}", v.hidden_size)
  for proj in ("q_proj", "k_proj", "v_proj"):
    add(vl + f"self_attn.{proj}.weight", f"vision_tower/layers/self_attn/{proj}/kernel", "linear", (v.hidden_size,) + vh)
    add(vl + f"self_attn.{proj}.bias", f"vision_tower/layers/self_attn/{proj}/bias", "bias_heads", vh)
  add(vl + "self_attn.out_proj.weight", "vision_tower/layers/self_attn/out_proj/kernel", "linear_out",
      vh + (v.hidden_size,))
  add(vl + "self_attn.out_proj.bias", "vision_tower/layers/self_attn/out_proj/bias", "copy", (v.hidden_size,))
  _mlp_rules(add, vl + "mlp", "vision_tower/layers/mlp", v)
  return out


def _clip_rules(v: VisionConfig) -> list[Rule]:
  out = _vit_rules(v, patch_bias=False)
  for norm in ("pre_layrnorm", "post_layernorm"):
    _layer_norm_rules(_add(out), "vision_tower." + norm, "vision_tower/" + norm, v.hidden_size)
  return out


def _siglip_rules(v: VisionConfig) -> list[Rule]:
  """SigLIP's ViT, its post_layernorm and, with vision_use_head, the attention-pooling head (nn.MultiheadAttention's
  packed in_proj: q, k and v stacked on the output axis)."""
  out = _vit_rules(v, patch_bias=True)
  add, vh, head = _add(out), (v.num_attention_heads, v.head_dim), "vision_tower.head."
  _layer_norm_rules(add, "vision_tower.post_layernorm", "vision_tower/post_layernorm", v.hidden_size)
  if v.vision_use_head:
    add(head + "probe", "vision_tower/head/probe", "copy", (1, 1, v.hidden_size))
    add(head + "attention.in_proj_weight", "vision_tower/head/in_proj/kernel", "linear", (v.hidden_size, 3) + vh)
    add(head + "attention.in_proj_bias", "vision_tower/head/in_proj/bias", "bias_heads", (3,) + vh)
    add(head + "attention.out_proj.weight", "vision_tower/head/out_proj/kernel", "linear_out", vh + (v.hidden_size,))
    add(head + "attention.out_proj.bias", "vision_tower/head/out_proj/bias", "copy", (v.hidden_size,))
    _layer_norm_rules(add, head + "layernorm", "vision_tower/head/layernorm", v.hidden_size)
    _mlp_rules(add, head + "mlp", "vision_tower/head/mlp", v)
  return out


def _llama_rules(t: TextConfig) -> list[Rule]:
  """LLaMA-architecture decoders; which biases exist is the config's (Qwen2: q/k/v only)."""
  out: list[Rule] = []
  add = _add(out)
  th, kvh = (t.num_attention_heads, t.head_dim), (t.num_key_value_heads, t.head_dim)
  lm, ll = "language_model.model.", "language_model.model.layers.{i}."
  add(lm + "embed_tokens.weight", "language_model/embed_tokens/embedding", "copy", (t.vocab_size, t.hidden_size))
  add(lm + "norm.weight", "language_model/norm/scale", "copy", (t.hidden_size,))
  add(ll + "input_layernorm.weight", "language_model/layers/input_norm/scale", "copy", (t.hidden_size,))
  add(ll + "post_attention_layernorm.weight", "language_model/layers/post_attention_norm/scale", "copy",
      (t.hidden_size,))
  for proj, heads in (("q_proj", th), ("k_proj", kvh), ("v_proj", kvh)):
    add(ll + f"self_attn.{proj}.weight", f"language_model/layers/self_attn/{proj}/kernel", "linear",
        (t.hidden_size,) + heads)
    if t.qkv_bias:
      add(ll + f"self_attn.{proj}.bias", f"language_model/layers/self_attn/{proj}/bias", "bias_heads", heads)
  add(ll + "self_attn.o_proj.weight", "language_model/layers/self_attn/o_proj/kernel", "linear_out",
      th + (t.hidden_size,))
  if t.o_proj_bias:
    add(ll + "self_attn.o_proj.bias", "language_model/layers/self_attn/o_proj/bias", "copy", (t.hidden_size,))
  for proj, fan_in, fan_out in (("gate_proj", t.hidden_size, t.intermediate_size),
                                ("up_proj", t.hidden_size, t.intermediate_size),
                                ("down_proj", t.intermediate_size, t.hidden_size)):
    add(ll + f"mlp.{proj}.weight", f"language_model/layers/mlp/{proj}/kernel", "linear", (fan_in, fan_out))
    if t.mlp_bias:
      add(ll + f"mlp.{proj}.bias", f"language_model/layers/mlp/{proj}/bias", "copy", (fan_out,))
  if not t.tie_word_embeddings:
    add("language_model.lm_head.weight", "language_model/lm_head/kernel", "linear", (t.hidden_size, t.vocab_size))
  return out


# vision_config.model_type / text_config.model_type -> that family's rows (as models/llava.py builds its modules).
VISION_RULES: dict[str, Callable[[VisionConfig], list[Rule]]] = {
    "clip_vision_model": _clip_rules,
    "siglip_vision_model": _siglip_rules,
}
TEXT_RULES: dict[str, Callable[[TextConfig], list[Rule]]] = {
    "llama": _llama_rules,
    "mistral": _llama_rules,
    "qwen2": _llama_rules,
}


def _projector_rules(config: LlavaConfig) -> list[Rule]:
  out: list[Rule] = []
  add, hidden = _add(out), config.text.hidden_size
  projections = ["linear_1"] if config.projector_type == "linear" else ["linear_1", "linear_2"]
  for name in projections:
    fan_in = config.vision_feature_size if name == "linear_1" else hidden
    add(f"multi_modal_projector.{name}.weight", f"projector/{name}/kernel", "linear", (fan_in, hidden))
    if config.multimodal_projector_bias:
      add(f"multi_modal_projector.{name}.bias", f"projector/{name}/bias", "copy", (hidden,))
  return out


def _newline_rules(config: LlavaConfig) -> list[Rule]:
  if not config.has_image_newline:
    return []
  return [Rule("image_newline", "image_newline", "copy", (config.text.hidden_size,))]


def _resampler_rules(config: LlavaConfig) -> list[Rule]:
  """NeXT-Video's `conv` pooling of frame features (its average and max pooling have no weights); transformers 5
  names it as in memory, under `model.`, in every layout."""
  if config.spatial_pool_mode != "conv":
    return []
  hidden, stride = config.vision.hidden_size, config.spatial_pool_stride
  hf = "model.vision_resampler.pool."
  return [Rule(hf + "weight", "vision_resampler/kernel", "conv", (stride, stride, hidden, hidden)),
          Rule(hf + "bias", "vision_resampler/bias", "copy", (hidden,))]


def rules(config: LlavaConfig) -> list[Rule]:
  """Every tensor of the model: the tower's rows, the projector's, LLaVA-NeXT's image_newline and NeXT-Video's
  pooling convolution, the decoder's."""
  return (VISION_RULES[config.vision.model_type](config.vision) + _projector_rules(config) + _newline_rules(config)
          + _resampler_rules(config) + TEXT_RULES[config.text.model_type](config.text))


def layer_count(rule: Rule, config: LlavaConfig) -> int:
  if rule.path.startswith("vision_tower/"):
    return config.vision.num_hidden_layers
  return config.text.num_hidden_layers


def hf_names(rule: Rule, config: LlavaConfig) -> list[str]:
  if not rule.stacked:
    return [rule.hf]
  return [rule.hf.format(i=i) for i in range(layer_count(rule, config))]


# ---- the three HF key layouts ------------------------------------------------------------------
# "saved": what transformers 5 writes to disk (canonical here); "memory": its in-memory module
# names; "hub": older hub checkpoints with CLIPVisionModel's `vision_model.` level.

_LAYOUT_PREFIXES = {
    "saved": [],
    "memory": [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
               ("image_newline", "model.image_newline")],
    "hub": [("vision_tower.", "vision_tower.vision_model.")],
}
LAYOUTS = tuple(_LAYOUT_PREFIXES)


def detect_layout(names) -> str:
  names = list(names)
  if any(n.startswith("model.language_model.") or n.startswith("model.vision_tower.") for n in names):
    return "memory"
  if any(n.startswith("vision_tower.vision_model.") for n in names):
    return "hub"
  return "saved"


def to_layout(canonical: str, layout: str) -> str:
  for old, new in _LAYOUT_PREFIXES[layout]:
    if canonical.startswith(old):
      return new + canonical[len(old):]
  return canonical


# ---- whole-model conversion --------------------------------------------------------------------


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _get(tree: dict, path: str):
  for p in path.split("/"):
    tree = tree[p]
  return tree


def hf_to_params(read: Callable[[str], np.ndarray], config: LlavaConfig, layout: str = "saved",
                 source: str = "checkpoint") -> dict:
  """Builds our parameter tree by reading HF tensors one at a time with `read(name)`.

  `read` must raise KeyError for a missing tensor. Tensors keep their stored dtype.
  """
  params: dict = {}
  for rule in rules(config):
    stacked = None
    for i, name in enumerate(hf_names(rule, config)):
      name = to_layout(name, layout)
      try:
        tensor = read(name)
      except KeyError:
        raise LlavaJaxError(f"{source}: missing tensor {name}") from None
      value = transform_checked(tensor, rule, name, source)
      if not rule.stacked:
        _set(params, rule.path, value)
        continue
      if stacked is None:
        stacked = np.empty((layer_count(rule, config),) + rule.shape, value.dtype)
      stacked[i] = value
    if stacked is not None:
      _set(params, rule.path, stacked)
  return params


def transform_checked(tensor: np.ndarray, rule: Rule, name: str, source: str) -> np.ndarray:
  """HF `tensor` named `name` -> ours (one layer's), after checking its shape."""
  expected = _hf_shape(rule)
  if tuple(tensor.shape) != expected:
    raise LlavaJaxError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {expected}")
  return TRANSFORMS[rule.transform][0](tensor, rule.shape)


def _hf_shape(rule: Rule) -> tuple[int, ...]:
  _, backward = TRANSFORMS[rule.transform]
  return tuple(backward(np.empty(rule.shape, np.uint8)).shape)


def params_to_hf(params: dict, config: LlavaConfig, layout: str = "saved") -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array) one tensor at a time, in table order."""
  for rule in rules(config):
    _, backward = TRANSFORMS[rule.transform]
    value = _get(params, rule.path)
    for i, name in enumerate(hf_names(rule, config)):
      layer_value = np.asarray(value[i] if rule.stacked else value)
      yield to_layout(name, layout), np.ascontiguousarray(backward(layer_value))


def expected_hf_names(config: LlavaConfig, layout: str = "saved") -> list[str]:
  return [to_layout(name, layout) for rule in rules(config) for name in hf_names(rule, config)]
