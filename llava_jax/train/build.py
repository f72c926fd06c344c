"""What a training config builds: the checked config, the model source, the input pipeline and
the trainer. Every import of JAX waits for a call, so configs can import `STAGE_TRAINABLE` cheaply."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from llava_jax.errors import LlavaJaxError

# `stage` -> the `trainable` rules it means: (regex over "/"-joined parameter paths, trains?), first match wins.
# LLaVA-NeXT's image_newline (a top-level parameter) trains with the projector. The LoRA stages train the
# adapters (`lora.*` config keys) and the projector (LLaVA's non-LoRA trainables) over a frozen base.
_LORA_TRAINABLE = [(".*/lora_[ab]", True), ("projector/.*", True), ("image_newline", True), (".*", False)]
STAGE_TRAINABLE = {
    "pretrain": [("projector/.*", True), ("image_newline", True), (".*", False)],
    "finetune": [("vision_tower/.*", False), (".*", True)],
    "finetune_lora": _LORA_TRAINABLE,
    "finetune_qlora": _LORA_TRAINABLE,
    # LLaVA-OneVision's stages after the first (configs/llava_onevision.py): the whole model, vision tower included.
    "knowledge": [(".*", True)],
    "single_image": [(".*", True)],
    "onevision": [(".*", True)],
}
DTYPES = ("float32", "bfloat16")


def check_config(cfg, needs_source: bool = True) -> None:
  """Raises on a bad key; `needs_source=False` skips what only loading weights and tokenizer needs."""
  if cfg.stage not in STAGE_TRAINABLE:
    raise LlavaJaxError(f"config: stage must be one of {sorted(STAGE_TRAINABLE)}, got {cfg.stage!r}")
  if cfg.dtype not in DTYPES:
    raise LlavaJaxError(f"config: dtype must be one of {DTYPES}, got {cfg.dtype!r}")
  if frozen_dtype(cfg) not in DTYPES:
    raise LlavaJaxError(f"config: frozen_dtype must be one of {DTYPES}, got {frozen_dtype(cfg)!r}")
  positive = {"batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps, "log_every": cfg.log_every,
              "keep_checkpoints": cfg.keep_checkpoints}
  for key, value in positive.items():
    if int(value) < 1:
      raise LlavaJaxError(f"config: {key} must be >= 1, got {value}")
  for key in ("total_steps", "checkpoint_every", "lr", "weight_decay", "max_grad_norm"):
    if cfg[key] < 0:
      raise LlavaJaxError(f"config: {key} must be >= 0, got {cfg[key]}")
  if not 0 <= cfg.warmup_ratio <= 1:
    raise LlavaJaxError(f"config: warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
  lora_spec(cfg)
  if needs_source and not cfg.init and not cfg.tokenizer:
    raise LlavaJaxError("config: random init (init='') needs `tokenizer`, a folder with tokenizer files")


def lora_spec(cfg):
  """The config's `lora` section as a LoraConfig, or None without adapters (no section, or empty targets)."""
  section = cfg.get("lora")
  if section is None or not section.targets:
    return None
  from llava_jax.models.lora import LoraConfig  # pylint: disable=import-outside-toplevel
  return LoraConfig(rank=int(section.rank), alpha=float(section.alpha), targets=str(section.targets),
                    dropout=float(section.dropout), quantize=str(section.quantize), group_size=int(section.group_size))


def frozen_dtype(cfg) -> str:
  """How the parameters `trainable` freezes are stored (configs older than the key: float32, like the rest)."""
  return cfg.get("frozen_dtype", "float32")


def trainable_rules(cfg) -> list:
  return list(cfg.trainable) if cfg.trainable else STAGE_TRAINABLE[cfg.stage]


def lr_multiplier_rules(cfg) -> list:
  """`lr_multipliers` (absent or empty: every parameter at the config's lr)."""
  return list(cfg.get("lr_multipliers") or ()) or [(".*", 1.0)]


def named_model(name: str):
  """configs/models.py (beside the package in a source checkout) by name."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "configs", "models.py")
  spec = importlib.util.spec_from_file_location("llava_jax_configs_models", os.path.normpath(path))
  if spec is None or not os.path.exists(spec.origin):
    raise LlavaJaxError(f"config: model {name!r}: configs/models.py not found next to the package")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get(name)


@dataclasses.dataclass
class Source:
  config: Any            # LlavaConfig (architecture)
  params: Any | None     # host arrays, or None for random init
  assets_dir: str        # tokenizer / processor files


def load_source(cfg) -> Source:
  if cfg.init:
    from llava_jax.weights.model_folder import load_model  # pylint: disable=import-outside-toplevel
    loaded = load_model(cfg.init)
    return Source(loaded.config, loaded.params, loaded.assets_dir)
  if not os.path.isdir(cfg.tokenizer):
    raise LlavaJaxError(f"config: tokenizer: {cfg.tokenizer}: no such folder")
  return Source(named_model(cfg.model), None, cfg.tokenizer)


def runtime_model_config(cfg, architecture):
  """The architecture as the trainer builds it: the config's compute dtype, remat policy and attention kernel."""
  return architecture.replace(dtype=cfg.dtype, remat_policy=cfg.remat_policy, attention=cfg.attention,
                              lora=lora_spec(cfg))


def build_pipeline(cfg, model_config, assets_dir: str):
  """This host's input pipeline; `pipe.image_processor` is the preprocessing it applies."""
  from llava_jax.data import images, layouts, pipeline, processor  # pylint: disable=import-outside-toplevel
  tokenizer = processor.load_tokenizer(assets_dir)
  image_processor = images.ImageProcessor.from_folder(assets_dir, image_size=model_config.vision.image_size)
  layout = layouts.layout_for(model_config)
  layout.check_processor_files(assets_dir)
  data = pipeline.DataConfig.from_config(cfg.data)
  return pipeline.make_pipeline(data, tokenizer, image_processor, layout=layout, global_batch_size=cfg.batch_size,
                                seed=cfg.seed, image_token_id=model_config.image_token_index,
                                videos=video_samples(model_config, tokenizer, assets_dir, data.num_frames))


def video_samples(model_config, tokenizer, assets_dir: str, num_frames: int):
  """A video model's way with training video samples (None for models that take no videos): its video layout, the
  frame count (data.num_frames, else the model folder's) and the token of its video_token_index."""
  from llava_jax.data import video, video_io, video_samples as samples  # pylint: disable=import-outside-toplevel
  if model_config.model_type not in video.VIDEO_LAYOUTS:
    return None
  token_id = model_config.video_token_index
  return samples.VideoSamples(video.video_layout_for(model_config),
                              video_io.num_frames_for(assets_dir, model_config.model_type, num_frames or None),
                              tokenizer.convert_ids_to_tokens(token_id), token_id)


def build_trainer(cfg, model_config, total_steps: int):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from llava_jax import sharding  # pylint: disable=import-outside-toplevel
  from llava_jax.models.llava import Llava, abstract_params  # pylint: disable=import-outside-toplevel
  from llava_jax.train import optim, trainer  # pylint: disable=import-outside-toplevel
  model = Llava(model_config)
  abstract = abstract_params(model_config)
  multipliers = optim.lr_multipliers(nn.unbox(abstract), trainable_rules(cfg), lr_multiplier_rules(cfg))
  if model_config.lora is not None:
    check_adapters(model_config.lora, multipliers)
  tx, lr = optim.make_optimizer(cfg, multipliers, total_steps)
  mesh = sharding.make_mesh(cfg.mesh)
  per_step = sharding.batch_devices(mesh) * cfg.grad_accum_steps
  if cfg.batch_size % per_step:
    raise LlavaJaxError(f"config: batch_size {cfg.batch_size} must divide by mesh.data x mesh.fsdp x "
                        f"grad_accum_steps = {per_step}")
  mask = optim.trained(multipliers)
  abstract = trainer.store_frozen(abstract, mask, frozen_dtype(cfg))
  return trainer.Trainer(model, tx, mask, lr, mesh, abstract, cfg.grad_accum_steps, cfg.seed)


def check_adapters(spec, multipliers) -> None:
  """Raises when `lora.targets` makes no adapter, or a `trainable` rule trains a quantized kernel."""
  import jax  # pylint: disable=import-outside-toplevel
  from llava_jax.models import lora  # pylint: disable=import-outside-toplevel
  from llava_jax.train.optim import param_paths  # pylint: disable=import-outside-toplevel
  paths = dict(zip(jax.tree.leaves(param_paths(multipliers)), jax.tree.leaves(multipliers)))
  if not any(lora.is_adapter(path) for path in paths):
    raise LlavaJaxError(f"config: lora.targets {spec.targets!r} matches no linear layer "
                        "(paths look like language_model/layers/self_attn/q_proj)")
  for path, multiplier in paths.items():
    if lora.is_quantized(path) and multiplier:
      raise LlavaJaxError(f"config: trainable: {path!r} is a quantized frozen kernel (lora.quantize) and cannot train")

