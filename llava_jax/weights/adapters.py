"""LoRA adapters as files: PEFT folders both ways, LLaVA's released LoRA checkpoints in, and merging into the kernels.

A PEFT LoRA folder is `adapter_config.json` (peft's LoraConfig: r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` (or `.bin`) holding, for each adapted linear layer of the transformers model,
    base_model.model.{module}.lora_A.weight   (r, in)    our lora_a (in..., r), inputs flattened, transposed
    base_model.model.{module}.lora_B.weight   (out, r)   our lora_b (r, out...), outputs flattened, transposed
where {module} is the transformers 5 module name (`model.language_model.layers.0.self_attn.q_proj`: mapping's
"memory" layout; the older "saved" and "hub" layouts are read too). Whole tensors beside them replace the base's:
PEFT's `modules_to_save` (`base_model.model.model.multi_modal_projector.linear_1.weight`) and LLaVA-NeXT's
`base_model.model.model.image_newline`, a parameter that modules_to_save cannot name but that
`PeftModel.from_pretrained` loads all the same (it loads the file into the wrapped model with strict=False).

LLaVA's own LoRA releases (haotian-liu) are PEFT folders of its LlavaLlamaForCausalLM: `model.layers.0...` keys in
`adapter_model.bin`, and the projector (`model.mm_projector.0.weight`) and image_newline in
`non_lora_trainables.bin`; llava_orig.hf_name translates those names.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
from flax import traverse_util

from llava_jax.config import MODEL_TYPES, LlavaConfig
from llava_jax.errors import LlavaJaxError
from llava_jax.fileio import read_json
from llava_jax.models import quantize
from llava_jax.models.lora import LoraConfig
from llava_jax.weights import hf, llava_orig, mapping

CONFIG_FILE = "adapter_config.json"
SAFE_FILE, BIN_FILE = "adapter_model.safetensors", "adapter_model.bin"
NON_LORA_FILE = "non_lora_trainables.bin"  # LLaVA's projector (and image_newline) beside a LoRA release
PEFT_PREFIX = "base_model.model."
# mapping transforms of linear kernels -> how many leading axes of our kernel are its inputs.
_INPUT_AXES = {"linear": 1, "linear_out": 2}
_LORA_KEY = re.compile(r"(.+)\.lora_([AB])(?:\.default)?\.weight")
# What a LoRA export writes whole beside the adapters: LLaVA's non-LoRA trainables (what the LoRA stages train).
SAVED_WHOLE = ("multi_modal_projector", "image_newline")


def _flat(tree: dict) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def _linear_rules(config: LlavaConfig) -> list[mapping.Rule]:
  return [rule for rule in mapping.rules(config) if rule.transform in _INPUT_AXES]


def _module(rule: mapping.Rule) -> str:
  return rule.path.rsplit("/", 1)[0]


def _layers(rule: mapping.Rule, config: LlavaConfig) -> tuple[int, ...]:
  return (mapping.layer_count(rule, config),) if rule.stacked else ()


# ---- merging --------------------------------------------------------------------------------------


def float_kernel(flat: dict, rule: mapping.Rule, config: LlavaConfig) -> np.ndarray:
  """A linear layer's kernel as stored, or dequantized (float32) where QLoRA stores it quantized."""
  module = _module(rule)
  if rule.path in flat:
    return np.asarray(flat[rule.path])
  lead, spec = _layers(rule, config), config.lora
  n = math.prod(rule.shape[_INPUT_AXES[rule.transform]:])
  codes, scales = np.asarray(flat[f"{module}/kernel_q"]), np.asarray(flat[f"{module}/kernel_scale"])
  w = quantize.dequantize(codes.reshape(lead + (-1, n)), scales.reshape(lead + (-1, n)), spec.quantize,
                          spec.group_size)
  return np.asarray(w).reshape(lead + rule.shape)


def merged_kernel(flat: dict, rule: mapping.Rule, config: LlavaConfig) -> np.ndarray:
  """W + (alpha/rank)·A·B of an adapted layer, in float64 then the kernel's own dtype (float32 if quantized)."""
  module, lead = _module(rule), _layers(rule, config)
  w = float_kernel(flat, rule, config)
  a, b = np.asarray(flat[f"{module}/lora_a"], np.float64), np.asarray(flat[f"{module}/lora_b"], np.float64)
  rank = a.shape[-1]
  delta = a.reshape(lead + (-1, rank)) @ b.reshape(lead + (rank, -1))
  return (w.astype(np.float64) + config.lora.scale * delta.reshape(w.shape)).astype(w.dtype)


def merge(config: LlavaConfig, params: dict) -> tuple[LlavaConfig, dict]:
  """A LoRA model as the plain one: every adapted kernel W + (alpha/rank)·A·B (dequantized first under QLoRA)."""
  if config.lora is None:
    return config, params
  flat = _flat(params)
  for rule in _linear_rules(config):
    module = _module(rule)
    if f"{module}/lora_a" in flat:
      kernel = merged_kernel(flat, rule, config)
      for leaf in ("lora_a", "lora_b", "kernel_q", "kernel_scale"):
        flat.pop(f"{module}/{leaf}", None)
      flat[rule.path] = kernel
  return config.replace(lora=None), traverse_util.unflatten_dict(flat, sep="/")


# ---- export -----------------------------------------------------------------------------------------


def _module_pattern(rule: mapping.Rule) -> str:
  """The regex of a rule's transformers module names, every layer index matching."""
  name = mapping.to_layout(rule.hf, "memory").removesuffix(".weight")
  return r"\d+".join(re.escape(part) for part in name.split("{i}"))


def write_peft(out: str, config: LlavaConfig, params: dict, base_model: str | None = None) -> None:
  """The adapters of a LoRA model as a PEFT folder in the existing folder `out` (the caller makes it atomic), with
  the projector (its adapters merged in, if it has any) and image_newline whole."""
  from safetensors.numpy import save_file
  flat, tensors, targets = _flat(params), {}, []
  for rule in _linear_rules(config):
    module = _module(rule)
    if f"{module}/lora_a" not in flat or rule.hf.startswith(SAVED_WHOLE):
      continue
    targets.append(_module_pattern(rule))
    a, b = np.asarray(flat[f"{module}/lora_a"], np.float32), np.asarray(flat[f"{module}/lora_b"], np.float32)
    for i, name in enumerate(mapping.hf_names(rule, config)):
      prefix = PEFT_PREFIX + mapping.to_layout(name, "memory").removesuffix(".weight")
      layer_a, layer_b = (a[i], b[i]) if rule.stacked else (a, b)
      tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(layer_a.reshape(-1, config.lora.rank).T)
      tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(layer_b.reshape(config.lora.rank, -1).T)
  for rule in mapping.rules(config):
    if rule.hf.startswith(SAVED_WHOLE):
      adapted = rule.transform in _INPUT_AXES and f"{_module(rule)}/lora_a" in flat
      value = merged_kernel(flat, rule, config) if adapted else np.asarray(flat[rule.path])
      _, backward = mapping.TRANSFORMS[rule.transform]
      tensors[PEFT_PREFIX + mapping.to_layout(rule.hf, "memory")] = np.ascontiguousarray(backward(value))
  if not targets:
    raise LlavaJaxError(f"jax-to-peft: lora.targets {config.lora.targets!r} adapts no layer outside the projector")
  hf_class = MODEL_TYPES[config.model_type]
  adapter_config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
      "r": config.lora.rank, "lora_alpha": config.lora.alpha, "lora_dropout": config.lora.dropout,
      "target_modules": "|".join(f"(?:{t})" for t in targets), "modules_to_save": ["multi_modal_projector"],
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
      "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
      "auto_mapping": {"base_model_class": hf_class,
                       "parent_library": f"transformers.models.{config.model_type}.modeling_{config.model_type}"},
  }
  save_file(tensors, os.path.join(out, SAFE_FILE), metadata={"format": "pt"})
  with open(os.path.join(out, CONFIG_FILE), "w") as f:
    f.write(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


# ---- import -----------------------------------------------------------------------------------------


def _settings(folder: str, config: LlavaConfig) -> tuple[int, float, object]:
  """(rank, alpha, target_modules) of adapter_config.json, rejecting what our adapters cannot compute."""
  path = os.path.join(folder, CONFIG_FILE)
  d = read_json(path)
  if d.get("peft_type", "LORA") != "LORA":
    raise LlavaJaxError(f"{path}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
  base_class = (d.get("auto_mapping") or {}).get("base_model_class")
  if base_class and base_class != MODEL_TYPES[config.model_type]:
    raise LlavaJaxError(f"{path}: the adapter is for a {base_class}, the base model is a "
                        f"{MODEL_TYPES[config.model_type]}")
  for key in ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern"):
    if d.get(key):
      raise LlavaJaxError(f"{path}: {key} {d[key]!r} is not supported")
  if d.get("bias", "none") != "none":
    raise LlavaJaxError(f"{path}: bias {d['bias']!r} is not supported (only 'none')")
  rank, alpha = d.get("r"), d.get("lora_alpha", 8)
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise LlavaJaxError(f"{path}: r must be an integer >= 1, got {rank!r}")
  if not isinstance(alpha, (int, float)):
    raise LlavaJaxError(f"{path}: lora_alpha must be a number, got {alpha!r}")
  # rsLoRA scales by alpha/sqrt(r); ours by alpha/rank.
  return rank, float(alpha) * (math.sqrt(rank) if d.get("use_rslora") else 1.0), d.get("target_modules")


def _tensor_files(folder: str) -> list[str]:
  files = [f for f in (SAFE_FILE, BIN_FILE) if os.path.isfile(os.path.join(folder, f))][:1]
  if not files:
    raise LlavaJaxError(f"{folder}: no {SAFE_FILE} or {BIN_FILE}")
  return files + [NON_LORA_FILE] * os.path.isfile(os.path.join(folder, NON_LORA_FILE))


def _name_table(config: LlavaConfig) -> dict[str, tuple[mapping.Rule, int]]:
  """Every HF tensor name of the model, in each layout, -> (its rule, its layer index)."""
  table = {}
  for rule in mapping.rules(config):
    for i, name in enumerate(mapping.hf_names(rule, config)):
      for layout in mapping.LAYOUTS:
        table[mapping.to_layout(name, layout)] = (rule, i)
  return table


def _lookup(name: str, table: dict, config: LlavaConfig, kind: str) -> tuple[mapping.Rule, int] | None:
  if name in table:
    return table[name]
  release = llava_orig.RELEASES["spatial_unpad" if config.has_image_newline else "flat"]
  canonical = llava_orig.hf_name(name, kind, release)  # an original LLaVA name
  return table.get(canonical) if canonical else None


def _ours(value: np.ndarray, rule: mapping.Rule, side: str, rank: int, what: str) -> np.ndarray:
  """PEFT's lora_A (r, in) or lora_B (out, r) of one layer -> our lora_a (in..., r) or lora_b (r, out...)."""
  n_in = _INPUT_AXES[rule.transform]
  in_shape, out_shape = rule.shape[:n_in], rule.shape[n_in:]
  want = (rank, math.prod(in_shape)) if side == "A" else (math.prod(out_shape), rank)
  if tuple(value.shape) != want:
    raise LlavaJaxError(f"{what} has shape {tuple(value.shape)}, expected {want} (rank {rank} of {CONFIG_FILE} and "
                        "this base model)")
  return value.astype(np.float32).T.reshape(in_shape + (rank,) if side == "A" else (rank,) + out_shape)


def apply_adapter(folder: str, config: LlavaConfig, params: dict) -> tuple[LlavaConfig, dict]:
  """The base model (checkpoint-layout params, no adapters) with the PEFT or LLaVA LoRA folder applied: the
  config with the adapters' LoraConfig, the params with their lora_a / lora_b (zeros in layers the adapter leaves
  alone, an exact no-op) and the adapter's whole tensors in place of the base's."""
  if not os.path.isdir(folder):
    raise LlavaJaxError(f"{folder}: no such adapter folder")
  if config.lora is not None:
    raise LlavaJaxError(f"--adapter {folder}: the base model has LoRA adapters already; merge them first "
                        "(convert jax-to-hf)")
  rank, alpha, target_modules = _settings(folder, config)
  weights = hf.TensorFolder(folder, files=_tensor_files(folder))
  kind = "mlp2x_gelu" if any(".mm_projector.0." in n or ".mm_projector.2." in n for n in weights.names) else "linear"
  table, flat, modules, replaced = _name_table(config), _flat(params), set(), set()
  for key in weights.names:
    name = key.removeprefix(PEFT_PREFIX)
    lora = _LORA_KEY.fullmatch(name)
    found = _lookup(lora.group(1) + ".weight" if lora else name, table, config, kind)
    if found is None or lora and found[0].transform not in _INPUT_AXES:
      what = "linear layer" if lora else "parameter"
      raise LlavaJaxError(f"{weights.file_of(key)}: tensor {key} names no {what} of this {config.model_type} model")
    rule, i = found
    value, layers = weights.read(key), _layers(rule, config)
    if lora:
      value = _ours(value, rule, lora.group(2), rank, f"{weights.file_of(key)}: tensor {key}")
      modules.add(_module(rule))
      path = f"{_module(rule)}/lora_{lora.group(2).lower()}"
      if path not in flat:
        flat[path] = np.zeros(layers + value.shape, np.float32)
    else:
      path = rule.path
      value = mapping.transform_checked(value, rule, key, weights.file_of(key)).astype(np.asarray(flat[path]).dtype)
      if path not in replaced:  # a copy: the base's arrays stay as they were
        flat[path] = np.array(flat[path])
        replaced.add(path)
    if layers:
      flat[path][i] = value
    else:
      flat[path] = value
  if not modules:
    raise LlavaJaxError(f"{folder}: target_modules {target_modules!r} adapt no linear layer of this "
                        f"{config.model_type} model (no lora_A / lora_B tensors)")
  for module in modules:
    for side in ("a", "b"):
      if f"{module}/lora_{side}" not in flat:
        raise LlavaJaxError(f"{folder}: the adapter of {module} has no lora_{side.upper()}")
  spec = LoraConfig(rank=rank, alpha=alpha, targets="|".join(re.escape(m) for m in sorted(modules)))
  return config.replace(lora=spec), traverse_util.unflatten_dict(flat, sep="/")
