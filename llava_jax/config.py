"""Model configs (vision tower, language model, LLaVA) and their Hugging Face `config.json` form.

The dataclasses hold what the Flax modules need; `from_hf_dict`/`to_hf_dict` translate the
transformers 5 `llava` config (with `clip_vision_model` and `llama`/`mistral` text configs).
Keys we do not model are kept in `LlavaConfig.hf_extra` so a round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os

from llava_jax.errors import LlavaJaxError
from llava_jax.fileio import read_json

SUPPORTED_MODEL_TYPES = ("llava",)
SUPPORTED_VISION_TYPES = ("clip_vision_model",)
SUPPORTED_TEXT_TYPES = ("llama", "mistral")
PROJECTOR_TYPES = ("linear", "mlp2x")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 336
  patch_size: int = 14
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  projection_dim: int = 768  # unused by LLaVA; kept so config.json round-trips

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  model_type: str = "llama"
  vocab_size: int = 32064
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int = 128
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling_factor: float = 1.0  # rope_type "linear": positions are divided by this
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  attention_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None  # Mistral: a token attends to its last sliding_window tokens (itself included)


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_index: int = 32000
  image_seq_length: int = 576
  projector_type: str = "mlp2x"
  projector_hidden_act: str = "gelu"
  multimodal_projector_bias: bool = True
  vision_feature_layer: int | tuple[int, ...] = -2
  vision_feature_select_strategy: str = "default"
  pad_token_id: int | None = None
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  # Runtime choices (not architecture): compute dtype, rematerialization policy, whether both
  # towers' layers are scanned (training) or unrolled (inference; see models/llama.py),
  # and whether its kernels are stored output axes first (decoding; see models/layers.weight_dot).
  dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = True
  out_first_kernels: bool = False
  hf_extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def __post_init__(self):
    if self.projector_type not in PROJECTOR_TYPES:
      raise LlavaJaxError(f"config: projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise LlavaJaxError(
          "config: vision_feature_select_strategy must be 'default' or 'full', "
          f"got {self.vision_feature_select_strategy!r}")

  @property
  def feature_layers(self) -> tuple[int, ...]:
    """`vision_feature_layer` as a tuple of hidden-state indices (0 = embeddings output)."""
    layers = self.vision_feature_layer
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    n = self.vision.num_hidden_layers + 1
    out = []
    for layer in layers:
      index = layer + n if layer < 0 else layer
      if not 0 <= index < n:
        raise LlavaJaxError(f"config: vision_feature_layer {layer} is outside the {n} hidden states of the vision tower")
      out.append(index)
    return tuple(out)

  @property
  def tokens_per_image(self) -> int:
    return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

  @property
  def vision_feature_size(self) -> int:
    return self.vision.hidden_size * len(self.feature_layers)

  def replace(self, **changes) -> "LlavaConfig":
    return dataclasses.replace(self, **changes)

  # ---- Hugging Face config.json -------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, d: dict, source: str = "config.json") -> "LlavaConfig":
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise LlavaJaxError(f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    vd = d.get("vision_config") or {}
    td = d.get("text_config") or {}
    if vd.get("model_type", "clip_vision_model") not in SUPPORTED_VISION_TYPES:
      raise LlavaJaxError(f"{source}: unsupported vision_config.model_type {vd.get('model_type')!r}")
    if td.get("model_type", "llama") not in SUPPORTED_TEXT_TYPES:
      raise LlavaJaxError(f"{source}: unsupported text_config.model_type {td.get('model_type')!r}")
    vision = _from_dict(VisionConfig, vd)
    theta, factor = _rope_from_hf(td, source)
    text_fields = {k: v for k, v in td.items() if k not in ("rope_theta", "rope_scaling_factor")}
    text = _from_dict(TextConfig, text_fields)
    head_dim = td.get("head_dim") or text.hidden_size // text.num_attention_heads
    text = dataclasses.replace(
        text, rope_theta=theta, rope_scaling_factor=factor, head_dim=head_dim,
        num_key_value_heads=td.get("num_key_value_heads") or text.num_attention_heads)
    extras = d.get("llava_jax") or {}
    layer = d.get("vision_feature_layer", -2)
    kwargs = dict(
        vision=vision,
        text=text,
        image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
        projector_hidden_act=d.get("projector_hidden_act", "gelu"),
        multimodal_projector_bias=d.get("multimodal_projector_bias", True),
        vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        pad_token_id=d.get("pad_token_id", td.get("pad_token_id")),
        bos_token_id=td.get("bos_token_id", 1),
        eos_token_id=_tuple_or_int(td.get("eos_token_id", 2)),
        projector_type=extras.get("projector_type", "mlp2x"),
        hf_extra={k: v for k, v in d.items() if k not in _LLAVA_KEYS},
    )
    config = cls(**kwargs)
    seq_len = d.get("image_seq_length", config.tokens_per_image)
    config = config.replace(image_seq_length=seq_len)
    if seq_len != config.tokens_per_image:
      raise LlavaJaxError(
          f"{source}: image_seq_length is {seq_len} but the vision tower gives {config.tokens_per_image} tokens per image")
    return config

  def to_hf_dict(self) -> dict:
    v, t = self.vision, self.text
    vision = dict(dataclasses.asdict(v), model_type="clip_vision_model")
    text = {k: val for k, val in dataclasses.asdict(t).items() if k not in ("rope_theta", "rope_scaling_factor")}
    if text["sliding_window"] is None:
      del text["sliding_window"]
    rope = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling_factor != 1.0:
      rope = {"rope_type": "linear", "rope_theta": t.rope_theta, "factor": t.rope_scaling_factor}
    text.update(rope_parameters=rope, bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id,
                eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id)
    d = dict(self.hf_extra)
    d.update(
        architectures=d.get("architectures", ["LlavaForConditionalGeneration"]),
        model_type="llava",
        vision_config=vision,
        text_config=text,
        image_token_index=self.image_token_index,
        image_seq_length=self.image_seq_length,
        projector_hidden_act=self.projector_hidden_act,
        multimodal_projector_bias=self.multimodal_projector_bias,
        vision_feature_layer=(self.vision_feature_layer if isinstance(self.vision_feature_layer, int)
                              else list(self.vision_feature_layer)),
        vision_feature_select_strategy=self.vision_feature_select_strategy,
        tie_word_embeddings=t.tie_word_embeddings,
    )
    if self.pad_token_id is not None:
      d["pad_token_id"] = self.pad_token_id
    if self.projector_type != "mlp2x":
      d["llava_jax"] = {"projector_type": self.projector_type}
    return d


_LLAVA_KEYS = {
    "model_type", "vision_config", "text_config", "image_token_index", "image_token_id", "image_seq_length",
    "projector_hidden_act", "multimodal_projector_bias", "vision_feature_layer", "vision_feature_select_strategy",
    "pad_token_id", "tie_word_embeddings", "llava_jax",
}


def _from_dict(cls, d: dict):
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in d.items() if k in names and v is not None})


def _tuple_or_int(value):
  return tuple(value) if isinstance(value, list) else value


def _rope_from_hf(td: dict, source: str) -> tuple[float, float]:
  """Reads rope theta and linear scaling from either the v5 `rope_parameters` or the v4 keys."""
  params = td.get("rope_parameters") or td.get("rope_scaling") or {}
  theta = params.get("rope_theta", td.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return float(theta), 1.0
  if rope_type == "linear":
    return float(theta), float(params["factor"])
  raise LlavaJaxError(f"{source}: unsupported text_config rope_type {rope_type!r} (supported: default, linear)")


def load_config(folder: str) -> LlavaConfig:
  """Reads `folder/config.json` (HF llava format)."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise LlavaJaxError(f"{folder}: no config.json (not a Hugging Face or llava-jax model folder)")
  return LlavaConfig.from_hf_dict(read_json(path), source=path)


def save_config(config: LlavaConfig, folder: str) -> None:
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config.to_hf_dict(), f, indent=2, sort_keys=True)
    f.write("\n")

