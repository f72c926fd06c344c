"""Model configs (vision tower, language model, LLaVA) and their Hugging Face `config.json` form.

The dataclasses hold what the Flax modules need; `from_hf_dict`/`to_hf_dict` translate the
transformers 5 `llava`, `llava_next`, `llava_onevision` and `llava_next_video` configs (MODEL_TYPES). Its
`vision_config` and `text_config` sections are read and written by their family's row of VISION_FAMILIES /
TEXT_FAMILIES (keyed by the section's `model_type`): which keys the family's config.json carries, which it fixes by
architecture and transformers' defaults for the keys a file leaves out. Keys we do not model are kept (the
top level in `LlavaConfig.hf_extra`, each section's source dict in its own `hf_extra`), so a
config.json as transformers writes it round-trips exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Callable

from llava_jax.errors import LlavaJaxError
from llava_jax.fileio import read_json

if TYPE_CHECKING:
  from llava_jax.models.lora import LoraConfig

# config.json model_type -> the architecture transformers writes for it. `llava_next` adds AnyRes
# (image_grid_pinpoints, image_newline), `llava_onevision` its anyres_max downscaling and several images per
# prompt and videos, `llava_next_video` NeXT's videos (frame features pooled before the projector); how each type
# lays out an image's tokens is data/layouts.py's table, a video's data/video.py's.
MODEL_TYPES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
               "llava_onevision": "LlavaOnevisionForConditionalGeneration",
               "llava_next_video": "LlavaNextVideoForConditionalGeneration"}
ANYRES_TYPES = ("llava_next", "llava_onevision", "llava_next_video")  # with image_grid_pinpoints and image_newline
VIDEO_TYPES = ("llava_onevision", "llava_next_video")  # the types with a video_token_index
SPATIAL_POOL_MODES = ("average", "max", "conv")  # llava_next_video's spatial_pool_mode values
# transformers' top-level defaults of each type, for the keys a config.json leaves out.
_TYPE_DEFAULTS = {
    "llava": dict(image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "llava_next": dict(image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "llava_onevision": dict(image_token_index=151646, video_token_index=151647, vision_feature_layer=-1,
                            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9"),
    "llava_next_video": dict(image_token_index=32001, video_token_index=32000, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", spatial_pool_mode="average",
                             spatial_pool_stride=2),
}
ANYRES_MAX_PREFIX = "anyres_max_"
# transformers' LlavaNextConfig default (llava-v1.6's), and LlavaOnevisionConfig's: 1 to 6 tiles of 384 each way.
DEFAULT_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION_GRID_PINPOINTS = tuple((384 * rows, 384 * cols) for rows in range(1, 7) for cols in range(1, 7))
PROJECTOR_TYPES = ("linear", "mlp2x")
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash")  # LlavaConfig.attention (models/attention.select_kernel)
# transformers' rope types we compute (models/llama.rotary_inv_freq) and the rope_parameters each one reads.
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  model_type: str = "clip_vision_model"
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
  vision_use_head: bool = False  # SigLIP's attention-pooling head (unused by LLaVA; parsed and converted)
  hf_extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def __post_init__(self):
    _check_type("vision_config", self.model_type, VISION_FAMILIES)

  @property
  def class_tokens(self) -> int:
    """Tokens the tower outputs besides its patches (CLIP: the class token)."""
    return VISION_CLASS_TOKENS[self.model_type]

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """rope_parameters besides rope_theta; the fields a `rope_type` does not read (ROPE_TYPES) are unused."""
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise LlavaJaxError(f"config: unsupported rope_type {self.rope_type!r} (supported: {', '.join(ROPE_TYPES)})")


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
  rope_scaling: RopeScaling = RopeScaling()
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  qkv_bias: bool = False  # biases on q_proj, k_proj, v_proj (LLaMA's attention_bias; always on in Qwen2)
  o_proj_bias: bool = False  # LLaMA's attention_bias also covers o_proj; Qwen2 has none
  mlp_bias: bool = False
  sliding_window: int | None = None  # Mistral: a token attends to its last sliding_window tokens (itself included)
  hf_extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def __post_init__(self):
    _check_type("text_config", self.model_type, TEXT_FAMILIES)


def _check_type(section: str, model_type: str, families: dict, source: str = "config") -> None:
  if model_type not in families:
    raise LlavaJaxError(
        f"{source}: unsupported {section}.model_type {model_type!r} (supported: {', '.join(families)})")


@dataclasses.dataclass(frozen=True)
class Family:
  """How one family's config.json section reads into its dataclass and writes back.

  keys: dataclass fields the section carries under the same name (read, and always written);
  shared: section keys that set several fields at once (LLaMA's attention_bias: q/k/v and o biases);
  fixed: fields the architecture fixes, absent from its config.json (Qwen2's q/k/v biases);
  defaults: transformers' values for keys a config.json leaves out;
  check: rejects sections (defaults filled in) that describe what we do not implement.
  """
  keys: tuple[str, ...]
  shared: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  fixed: dict[str, object] = dataclasses.field(default_factory=dict)
  defaults: dict[str, object] = dataclasses.field(default_factory=dict)
  check: Callable[[dict, str], None] | None = None


def _qwen2_no_sliding_layers(section: dict, source: str) -> None:
  """Qwen2 windows the layers from max_window_layers on when use_sliding_window is set (per-layer
  windows, which we do not implement); released Qwen2 checkpoints leave it off."""
  types = section.get("layer_types") or (
      ["sliding_attention" if section.get("use_sliding_window") and i >= section.get("max_window_layers", 28)
       else "full_attention" for i in range(section["num_hidden_layers"])])
  if "sliding_attention" in types and section.get("use_sliding_window"):
    raise LlavaJaxError(f"{source}: text_config use_sliding_window {section['use_sliding_window']!r} (Qwen2's "
                        "per-layer sliding window) is not supported")


_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "hidden_act")
_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)

TEXT_FAMILIES = {
    "llama": Family(_TEXT_KEYS + ("head_dim", "mlp_bias"), shared={"attention_bias": ("qkv_bias", "o_proj_bias")},
                    defaults=dict(_TEXT_DEFAULTS, intermediate_size=11008, max_position_embeddings=2048,
                                  attention_bias=False, mlp_bias=False)),
    "mistral": Family(_TEXT_KEYS + ("head_dim", "sliding_window"),
                      defaults=dict(_TEXT_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                                    max_position_embeddings=4096 * 32, sliding_window=4096)),
    "qwen2": Family(_TEXT_KEYS, fixed={"qkv_bias": True}, check=_qwen2_no_sliding_layers,
                    defaults=dict(_TEXT_DEFAULTS, vocab_size=151936, intermediate_size=22016,
                                  num_key_value_heads=32, max_position_embeddings=32768, bos_token_id=None,
                                  eos_token_id=None)),
}
VISION_CLASS_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "image_size", "patch_size", "layer_norm_eps", "hidden_act")
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224)
VISION_FAMILIES = {
    "clip_vision_model": Family(
        _VISION_KEYS + ("projection_dim",),
        defaults=dict(_VISION_DEFAULTS, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu",
                      projection_dim=512)),
    "siglip_vision_model": Family(
        _VISION_KEYS + ("vision_use_head",),
        defaults=dict(_VISION_DEFAULTS, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                      vision_use_head=True)),
}


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  model_type: str = "llava"
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_index: int = 32000
  image_seq_length: int = 576  # features per tile (transformers keeps it for llava_next too; unused there)
  image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # llava_next's AnyRes resolutions (height, width)
  projector_type: str = "mlp2x"
  projector_hidden_act: str = "gelu"
  multimodal_projector_bias: bool = True
  vision_feature_layer: int | tuple[int, ...] = -2
  vision_feature_select_strategy: str = "default"
  # llava_onevision's "anyres_max_N": an image's feature grid larger than N tiles' is downscaled (data/onevision.py).
  vision_aspect_ratio: str | None = None
  video_token_index: int | None = None  # the VIDEO_TYPES' <video> token
  # llava_next_video's pooling of each frame's tower features (before the projector): mode and stride.
  spatial_pool_mode: str | None = None
  spatial_pool_stride: int = 2
  pad_token_id: int | None = None
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  # Runtime choices (not architecture): compute dtype, rematerialization policy, attention kernel,
  # whether both towers' layers are scanned (training) or unrolled (inference; see models/llama.py),
  # and whether its kernels are stored output axes first (decoding; see models/layers.weight_dot).
  dtype: str = "float32"
  remat_policy: str = "none"
  attention: str = "auto"
  scan_layers: bool = True
  out_first_kernels: bool = False
  lora: LoraConfig | None = None  # adapters (and QLoRA's quantized base) on the layers it targets: models/lora.py
  hf_extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise LlavaJaxError(f"config: unsupported model_type {self.model_type!r} (supported: {', '.join(MODEL_TYPES)})")
    if self.attention not in ATTENTION_KERNELS:
      raise LlavaJaxError(f"config: attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
    if self.projector_type not in PROJECTOR_TYPES:
      raise LlavaJaxError(f"config: projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise LlavaJaxError(
          "config: vision_feature_select_strategy must be 'default' or 'full', "
          f"got {self.vision_feature_select_strategy!r}")
    if (self.vision_aspect_ratio is not None) != (self.model_type == "llava_onevision"):
      raise LlavaJaxError(f"config: vision_aspect_ratio {self.vision_aspect_ratio!r} is for llava_onevision models "
                          f"only, and they need one (model_type {self.model_type!r})")
    if self.vision_aspect_ratio is not None:
      _anyres_max(self.vision_aspect_ratio, "config")
    if (self.video_token_index is not None) != (self.model_type in VIDEO_TYPES):
      raise LlavaJaxError(f"config: video_token_index {self.video_token_index!r} is for {' and '.join(VIDEO_TYPES)} "
                          f"models only, and they need one (model_type {self.model_type!r})")
    if (self.spatial_pool_mode is not None) != (self.model_type == "llava_next_video"):
      raise LlavaJaxError(f"config: spatial_pool_mode {self.spatial_pool_mode!r} is for llava_next_video models "
                          f"only, and they need one (model_type {self.model_type!r})")
    if self.spatial_pool_mode is not None:
      _check_spatial_pool(self.spatial_pool_mode, self.spatial_pool_stride, self.vision, "config")
    if self.spatial_pool_mode == "conv" and self.vision_feature_size != self.vision.hidden_size:
      raise LlavaJaxError("config: spatial_pool_mode 'conv' takes the vision tower's hidden size, not the features "
                          f"of {len(self.feature_layers)} vision_feature_layer(s) (transformers fails on them)")

  @property
  def anyres_max_tiles(self) -> int:
    """N of llava_onevision's vision_aspect_ratio "anyres_max_N"."""
    return _anyres_max(self.vision_aspect_ratio, "config")

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
  def tokens_per_tile(self) -> int:
    """Features the projector gives one tower input (a whole LLaVA-1.5 image, one AnyRes tile): the tower's
    tokens, less the first one under the "default" strategy. As in transformers, that is CLIP's class token, and
    a patch of a tower without one (SigLIP; its released LLaVA models use "full")."""
    dropped = 1 if self.vision_feature_select_strategy == "default" else 0
    return self.vision.num_patches + self.vision.class_tokens - dropped

  @property
  def has_image_newline(self) -> bool:
    """LLaVA-NeXT's learned embedding closing each row of an image's AnyRes feature grid."""
    return self.model_type in ANYRES_TYPES

  @property
  def media_token_ids(self) -> tuple[int, ...]:
    """The tokens that take image or video features: <image>, and <video> where the model has one."""
    video = () if self.video_token_index is None else (self.video_token_index,)
    return (self.image_token_index,) + video

  @property
  def pooled_tokens_per_frame(self) -> int:
    """llava_next_video: features of one frame after its spatial pooling (floor, as torch's pooling layers)."""
    side = self.vision.image_size // self.vision.patch_size // self.spatial_pool_stride
    return side * side

  @property
  def vision_feature_size(self) -> int:
    return self.vision.hidden_size * len(self.feature_layers)

  def replace(self, **changes) -> "LlavaConfig":
    return dataclasses.replace(self, **changes)

  # ---- Hugging Face config.json -------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, d: dict, source: str = "config.json") -> "LlavaConfig":
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
      raise LlavaJaxError(f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
    td = d.get("text_config") or {}
    vision = VisionConfig(**_read_section(VisionConfig, VISION_FAMILIES, "vision_config", d.get("vision_config") or {},
                                          source))
    text = _text_from_hf(td, source)
    extras = d.get("llava_jax") or {}
    top = _TYPE_DEFAULTS[model_type]
    layer = d.get("vision_feature_layer", top["vision_feature_layer"])
    defaults = TEXT_FAMILIES[text.model_type].defaults
    kwargs = dict(
        model_type=model_type,
        vision=vision,
        text=text,
        image_token_index=d.get("image_token_index", d.get("image_token_id", top["image_token_index"])),
        projector_hidden_act=d.get("projector_hidden_act", "gelu"),
        multimodal_projector_bias=d.get("multimodal_projector_bias", True),
        vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", top["vision_feature_select_strategy"]),
        pad_token_id=d.get("pad_token_id", td.get("pad_token_id")),
        bos_token_id=td.get("bos_token_id", defaults["bos_token_id"]),
        eos_token_id=_tuple_or_int(td.get("eos_token_id", defaults["eos_token_id"])),
        projector_type=extras.get("projector_type", "mlp2x"),
        hf_extra={k: v for k, v in d.items() if k not in _LLAVA_KEYS},
    )
    if model_type in ANYRES_TYPES:
      pinpoints = d.get("image_grid_pinpoints")
      if pinpoints is None:
        pinpoints = ONEVISION_GRID_PINPOINTS if model_type == "llava_onevision" else DEFAULT_GRID_PINPOINTS
      kwargs["image_grid_pinpoints"] = _grid_pinpoints(pinpoints, vision.image_size, source)
      _check_anyres_strategy(kwargs["vision_feature_select_strategy"], vision, source)
    if model_type in VIDEO_TYPES:
      kwargs["video_token_index"] = d.get("video_token_index", d.get("video_token_id", top["video_token_index"]))
    if model_type == "llava_next_video":
      kwargs["spatial_pool_mode"] = d.get("spatial_pool_mode", top["spatial_pool_mode"])
      kwargs["spatial_pool_stride"] = d.get("spatial_pool_stride", top["spatial_pool_stride"])
      _check_spatial_pool(kwargs["spatial_pool_mode"], kwargs["spatial_pool_stride"], vision, source)
    if model_type == "llava_onevision":
      kwargs["vision_aspect_ratio"] = d.get("vision_aspect_ratio", top["vision_aspect_ratio"])
      _anyres_max(kwargs["vision_aspect_ratio"], source)
    if extras.get("lora"):
      kwargs["lora"] = _lora_from_dict(extras["lora"], source)
    config = cls(**kwargs)
    seq_len = d.get("image_seq_length", config.tokens_per_tile if model_type == "llava" else 576)
    config = config.replace(image_seq_length=seq_len)
    if model_type == "llava" and seq_len != config.tokens_per_tile:
      raise LlavaJaxError(
          f"{source}: image_seq_length is {seq_len} but the vision tower gives {config.tokens_per_tile} tokens per image")
    return config

  def to_hf_dict(self) -> dict:
    t = self.text
    text = _write_section(t, TEXT_FAMILIES)
    for key in _ROPE_KEYS:
      text.pop(key, None)
    scaling = t.rope_scaling
    text["rope_parameters"] = {"rope_type": scaling.rope_type, "rope_theta": t.rope_theta,
                               **{k: getattr(scaling, k) for k in ROPE_TYPES[scaling.rope_type]}}
    if "head_dim" in text or t.head_dim != t.hidden_size // t.num_attention_heads:
      text["head_dim"] = t.head_dim
    text.setdefault("pad_token_id", self.pad_token_id)  # the text model's own, where the source had one
    text.update(bos_token_id=self.bos_token_id,
                eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id)
    d = dict(self.hf_extra)
    d.update(
        architectures=d.get("architectures", [MODEL_TYPES[self.model_type]]),
        model_type=self.model_type,
        vision_config=_write_section(self.vision, VISION_FAMILIES),
        text_config=text,
        image_token_index=self.image_token_index,
        projector_hidden_act=self.projector_hidden_act,
        multimodal_projector_bias=self.multimodal_projector_bias,
        vision_feature_layer=(self.vision_feature_layer if isinstance(self.vision_feature_layer, int)
                              else list(self.vision_feature_layer)),
        vision_feature_select_strategy=self.vision_feature_select_strategy,
        tie_word_embeddings=t.tie_word_embeddings,
    )
    if self.model_type != "llava_onevision":  # transformers' OneVision config has no image_seq_length
      d["image_seq_length"] = self.image_seq_length
    if self.image_grid_pinpoints is not None:
      d["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
    if self.vision_aspect_ratio is not None:
      d["vision_aspect_ratio"] = self.vision_aspect_ratio
    if self.video_token_index is not None:
      d["video_token_index"] = self.video_token_index
    if self.spatial_pool_mode is not None:
      d.update(spatial_pool_mode=self.spatial_pool_mode, spatial_pool_stride=self.spatial_pool_stride)
    if self.pad_token_id != text["pad_token_id"]:  # LLaVA's own pad token, e.g. one added beside the text model's
      d["pad_token_id"] = self.pad_token_id
    if self.projector_type != "mlp2x":
      d["llava_jax"] = {"projector_type": self.projector_type}
    if self.lora is not None:  # a LoRA training run's model: its parameters hold the adapters
      d.setdefault("llava_jax", {})["lora"] = dataclasses.asdict(self.lora)
    return d


def _lora_from_dict(d, source: str) -> "LoraConfig":
  from llava_jax.models.lora import LoraConfig  # pylint: disable=import-outside-toplevel  (pulls in JAX)
  try:
    return LoraConfig(**d)
  except TypeError as e:
    raise LlavaJaxError(f"{source}: llava_jax.lora: {e}") from None
  except LlavaJaxError as e:
    raise LlavaJaxError(f"{source}: llava_jax.{str(e).removeprefix('config: ')}") from None


_LLAVA_KEYS = {
    "model_type", "vision_config", "text_config", "image_token_index", "image_token_id", "image_seq_length",
    "projector_hidden_act", "multimodal_projector_bias", "vision_feature_layer", "vision_feature_select_strategy",
    "pad_token_id", "tie_word_embeddings", "llava_jax", "image_grid_pinpoints", "vision_aspect_ratio",
    "video_token_index", "video_token_id", "spatial_pool_mode", "spatial_pool_stride",
}
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")  # v5 and v4 spellings; written back as v5


def _read_section(cls, families: dict, section: str, d: dict, source: str) -> dict:
  """The dataclass fields a config.json section gives, by its family's row (the source dict kept as hf_extra)."""
  model_type = d.get("model_type", cls.model_type)
  _check_type(section, model_type, families, source)
  family = families[model_type]
  values = {**family.defaults, **d}  # an explicit null stays: the field's own default (Mistral's sliding_window)
  if family.check:
    family.check(values, source)
  fields = {k: values[k] for k in family.keys if values.get(k) is not None}
  for key, targets in family.shared.items():
    if values.get(key) is not None:
      fields.update(dict.fromkeys(targets, values[key]))
  return dict(fields, **family.fixed, model_type=model_type, hf_extra=dict(d))


def _write_section(config, families: dict) -> dict:
  """The config.json section of a VisionConfig/TextConfig: its source dict updated with every modelled value."""
  family = families[config.model_type]
  for name, value in family.fixed.items():
    if getattr(config, name) != value:
      raise LlavaJaxError(f"config: {config.model_type} models have {name}={value!r}, got {getattr(config, name)!r}")
  out = dict(config.hf_extra, model_type=config.model_type, **{k: getattr(config, k) for k in family.keys})
  for key, targets in family.shared.items():
    values = {getattr(config, t) for t in targets}
    if len(values) != 1:
      raise LlavaJaxError(f"config: {config.model_type}'s {key} sets {', '.join(targets)} alike; they differ")
    out[key] = values.pop()
  return out


def _text_from_hf(td: dict, source: str) -> TextConfig:
  fields = _read_section(TextConfig, TEXT_FAMILIES, "text_config", td, source)
  theta, scaling = _rope_from_hf(td, source)
  text = TextConfig(**fields, rope_theta=theta, rope_scaling=scaling)
  return dataclasses.replace(
      text, head_dim=td.get("head_dim") or text.hidden_size // text.num_attention_heads,
      num_key_value_heads=fields.get("num_key_value_heads") or text.num_attention_heads)


def _grid_pinpoints(value, image_size: int, source: str) -> tuple[tuple[int, int], ...]:
  """AnyRes image_grid_pinpoints: [height, width] pairs, each side a multiple of the tower's image size."""
  if isinstance(value, tuple):  # the type's default
    return value
  pairs = value if isinstance(value, list) else [value]
  if not pairs:
    raise LlavaJaxError(f"{source}: image_grid_pinpoints is empty")
  for pair in pairs:
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) and v > 0 for v in pair)):
      raise LlavaJaxError(f"{source}: image_grid_pinpoints entry {pair!r} is not a [height, width] pair of positive ints")
    if pair[0] % image_size or pair[1] % image_size:
      raise LlavaJaxError(f"{source}: image_grid_pinpoints entry {pair} is not a multiple of the vision tower's "
                          f"image_size {image_size}")
  return tuple((int(h), int(w)) for h, w in pairs)


def _check_anyres_strategy(strategy: str, vision: VisionConfig, source: str) -> None:
  """AnyRes lays each tile's features out as its patch grid, so the strategy must leave exactly the patches:
  "full" keeps a class token, "default" drops a patch of a tower without one (transformers' LlavaNext fails on
  either)."""
  if strategy == "full" and vision.class_tokens:
    raise LlavaJaxError(f"{source}: vision_feature_select_strategy 'full' keeps the {vision.model_type} class token, "
                        "which the AnyRes feature grid of llava_next has no place for (use 'default')")
  if strategy == "default" and not vision.class_tokens:
    raise LlavaJaxError(f"{source}: vision_feature_select_strategy 'default' drops the first token, and "
                        f"{vision.model_type} has no class token: a patch the AnyRes feature grid of llava_next "
                        "needs (use 'full')")


def _check_spatial_pool(mode, stride, vision: VisionConfig, source: str) -> None:
  """llava_next_video's frame pooling: a mode we compute and a stride that leaves the patch grid a feature."""
  if mode not in SPATIAL_POOL_MODES:
    raise LlavaJaxError(f"{source}: spatial_pool_mode {mode!r} is not supported (supported: "
                        f"{', '.join(SPATIAL_POOL_MODES)})")
  side = vision.image_size // vision.patch_size
  if not (isinstance(stride, int) and 0 < stride <= side):
    raise LlavaJaxError(f"{source}: spatial_pool_stride {stride!r} is not a positive int of at most the "
                        f"{side} patches per side")


def _anyres_max(value, source: str) -> int:
  """N of an "anyres_max_N" vision_aspect_ratio (the only kind transformers' OneVision model reads)."""
  digits = value[len(ANYRES_MAX_PREFIX):] if isinstance(value, str) and value.startswith(ANYRES_MAX_PREFIX) else ""
  if not (digits.isdigit() and int(digits) > 0):
    raise LlavaJaxError(f"{source}: vision_aspect_ratio {value!r} is not {ANYRES_MAX_PREFIX}N with N a positive int")
  return int(digits)


def _tuple_or_int(value):
  return tuple(value) if isinstance(value, list) else value


def _rope_from_hf(td: dict, source: str) -> tuple[float, RopeScaling]:
  """Rope theta and scaling from either the v5 `rope_parameters` or the v4 keys."""
  params = td.get("rope_parameters") or td.get("rope_scaling") or {}
  theta = params.get("rope_theta", td.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise LlavaJaxError(
        f"{source}: unsupported text_config rope_type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
  missing = [k for k in ROPE_TYPES[rope_type] if params.get(k) is None]
  if missing:
    raise LlavaJaxError(f"{source}: text_config rope_parameters of rope_type {rope_type!r} lack {missing[0]}")
  return float(theta), RopeScaling(rope_type, **{k: params[k] for k in ROPE_TYPES[rope_type]})


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
