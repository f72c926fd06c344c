"""The `llava-jax convert` directions. Each writes into a temporary sibling of the output
folder that is renamed into place only when everything succeeded (fileio.atomic_output_dir)."""

from __future__ import annotations

import os

from llava_jax.errors import LlavaJaxError
from llava_jax.fileio import atomic_output_dir
from llava_jax.weights import hf, model_folder

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_SHARD_BYTES = 5 * 10**9


def _check_output(src: str, out: str) -> None:
  # Fail before reading gigabytes when the output cannot be written anyway.
  if os.path.exists(out):
    raise LlavaJaxError(f"{os.path.abspath(out)}: output folder already exists")
  if not os.path.isdir(src):
    raise LlavaJaxError(f"{src}: no such folder")


def hf_to_jax(src: str, out: str) -> str:
  """HF LLaVA folder -> llava-jax checkpoint folder (tensors keep their stored dtype)."""
  _check_output(src, out)
  config, params, source = hf.read_hf_llava(src)
  with atomic_output_dir(out) as tmp:
    model_folder.write_checkpoint(tmp, config, params, assets_dir=src, source=source,
                                config_json=os.path.join(src, "config.json"))
  return out


def jax_to_hf(src: str, out: str, dtype: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
  """Any folder `load_model` accepts -> HF LLaVA folder with the original names, layout and dtypes
  (or all tensors in `dtype`), sharded at `max_shard_bytes`."""
  if dtype is not None and dtype not in DTYPES:
    raise LlavaJaxError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
  if max_shard_bytes <= 0:
    raise LlavaJaxError(f"--max-shard-size: must be positive, got {max_shard_bytes} bytes")
  _check_output(src, out)
  _write_merged(model_folder.load_model(src), out, dtype, max_shard_bytes)
  return out


def merge_lora(base: str, adapter: str, out: str, dtype: str | None = None,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
  """A base model folder + a PEFT / LLaVA LoRA folder -> HF LLaVA folder with the adapters merged into the kernels
  (W + (alpha/rank)·A·B) and the adapter's whole tensors (the projector) in place of the base's."""
  if dtype is not None and dtype not in DTYPES:
    raise LlavaJaxError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
  _check_output(base, out)
  _write_merged(model_folder.load_model(base, adapter=adapter), out, dtype, max_shard_bytes)
  return out


def _write_merged(model: model_folder.LoadedModel, out: str, dtype: str | None, max_shard_bytes: int) -> None:
  """The model as an HF folder; a LoRA model (a LoRA run's workdir, a base + adapter) with its adapters merged."""
  from llava_jax.weights import adapters
  config, params = adapters.merge(model.config, model.params)
  with atomic_output_dir(out) as tmp:
    hf.write_hf_llava(tmp, config, params, model.hf_source, config_json=model.config_path,
                      assets_dir=model.assets_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)


def jax_to_peft(src: str, out: str, base_model: str | None = None) -> str:
  """A LoRA training workdir (or checkpoint folder) -> PEFT adapter folder (weights/adapters.py)."""
  from llava_jax.weights import adapters
  _check_output(src, out)
  model = model_folder.load_model(src)
  if model.config.lora is None:
    raise LlavaJaxError(f"{src}: not a LoRA model (its config.json has no llava_jax.lora section)")
  with atomic_output_dir(out) as tmp:
    adapters.write_peft(tmp, model.config, model.params, base_model)
  return out


def llava_to_hf(src: str, out: str, vision_tower: str | None = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
  """Original LLaVA release (haotian-liu LLaVA/NeXT, lmms-lab OneVision; + its CLIP or SigLIP folder, unless it
  embeds a known tower) -> HF LLaVA folder (see llava_orig)."""
  from llava_jax.weights import llava_orig
  _check_output(src, out)
  with atomic_output_dir(out) as tmp:
    llava_orig.convert(src, tmp, vision_tower, max_shard_bytes=max_shard_bytes)
  return out
