"""llava-jax checkpoint folders, and the one model loader everything else uses.

A llava-jax checkpoint folder (written by `convert hf-to-jax`, the trainer's export and the demo):

    config.json       HF llava config (the source's own file, verbatim, when converted from HF)
    llava_jax.json    {"format": "llava-jax", "version": 1,
                       "hf": {"layout", "config_from_hf", "dtypes": {HF name: dtype}}}
                      what jax-to-hf needs to give back the exact original tensors
    params/           Orbax StandardCheckpointer item: {vision_tower, projector, language_model},
                      layers stacked on axis 0, each array in its stored dtype
    tokenizer.json, tokenizer_config.json, preprocessor_config.json, chat_template.jinja, ...
                      the asset files (see hf.ASSET_FILES), copied as found

`load_model` also reads HF folders and training workdirs (see `_load_workdir`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from llava_jax.config import LlavaConfig, load_config, save_config
from llava_jax.errors import LlavaJaxError
from llava_jax.fileio import atomic_output_dir
from llava_jax.weights import hf, mapping

META_FILE = "llava_jax.json"
PARAMS_DIR = "params"
FORMAT = "llava-jax"


@dataclasses.dataclass
class LoadedModel:
  """A model ready to use: config, parameters and the folder holding its tokenizer/processor files.

  `params` leaves are host arrays (numpy for HF folders, CPU jax arrays for Orbax ones) in their
  stored dtype; callers cast and shard them. `hf_source` records how to write the exact original
  HF tensors back (key layout, per-tensor dtypes, whether config.json is the source's own).
  """
  config: LlavaConfig
  params: dict
  assets_dir: str
  source_format: str  # "hf" | "jax" | "workdir"
  hf_source: hf.HFSource | None = None
  config_path: str | None = None  # the HF config.json this model came with


def detect_format(path: str) -> str:
  if not os.path.isdir(path):
    raise LlavaJaxError(f"{path}: no such model folder")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  if os.path.isdir(os.path.join(path, PARAMS_DIR)) or os.path.isfile(os.path.join(path, META_FILE)):
    return "jax"
  return "hf"


def load_model(path: str, adapter: str | None = None) -> LoadedModel:
  """Loads an HF LLaVA folder, a llava-jax checkpoint folder, or a training workdir (latest step), with the
  PEFT / LLaVA LoRA folder `adapter` applied (weights/adapters.py)."""
  loaded = _load(os.fspath(path))
  if adapter is not None:
    from llava_jax.weights import adapters  # pylint: disable=import-outside-toplevel
    loaded.config, loaded.params = adapters.apply_adapter(adapter, loaded.config, loaded.params)
  return loaded


def _load(path: str) -> LoadedModel:
  kind = detect_format(path)
  if kind == "hf":
    config, params, source = hf.read_hf_llava(path)
    return LoadedModel(config, params, path, "hf", source, os.path.join(path, "config.json"))
  if kind == "jax":
    config = load_config(path)
    params = restore_params(os.path.join(path, PARAMS_DIR))
    check_params(params, config, os.path.join(path, PARAMS_DIR))
    return LoadedModel(config, params, path, "jax", read_meta(path), os.path.join(path, "config.json"))
  return _load_workdir(path)


def _load_workdir(path: str) -> LoadedModel:
  """A training workdir: `PATH/model/` (HF config.json + tokenizer/processor files, optionally
  llava_jax.json) and `PATH/checkpoints/`, an Orbax CheckpointManager directory whose steps hold an
  item named "params" saved with `ocp.args.StandardSave(params_dict)`. The latest step is used."""
  import orbax.checkpoint as ocp
  model_dir = os.path.join(path, "model")
  config = load_config(model_dir)
  ckpt_dir = os.path.join(path, "checkpoints")
  # The manager only finds the newest finished step; the params item is read on its own, so
  # Orbax does not warn about the items (optimizer, data position) a model load leaves behind.
  step = ocp.CheckpointManager(os.path.abspath(ckpt_dir)).latest_step()
  if step is None:
    raise LlavaJaxError(f"{ckpt_dir}: no finished checkpoint in this training workdir")
  params = restore_params(os.path.join(ckpt_dir, str(step), "params"))
  check_params(params, config, f"{ckpt_dir}/{step}/params")
  source = read_meta(model_dir) if os.path.isfile(os.path.join(model_dir, META_FILE)) else None
  return LoadedModel(config, params, model_dir, "workdir", source, os.path.join(model_dir, "config.json"))


def _host_targets(meta):
  # Restore onto the host CPU whatever mesh wrote it: loading never needs the saving topology.
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu), meta)


def _unwrap(params):
  params = dict(params)
  if set(params) == {"params"}:  # flax's {"params": ...} variables wrapper
    params = dict(params["params"])
  return params


def restore_params(params_dir: str) -> dict:
  import orbax.checkpoint as ocp
  if not os.path.isdir(params_dir):
    raise LlavaJaxError(f"{params_dir}: missing (a llava-jax checkpoint folder keeps its weights there)")
  from etils import epath  # pylint: disable=import-outside-toplevel  (orbax's path type)
  # The handler alone reads the item folder both a checkpoint folder and a training step hold
  # (a Checkpointer would also look for the step metadata a CheckpointManager keeps a level up).
  handler, directory = ocp.StandardCheckpointHandler(), epath.Path(os.path.abspath(params_dir))
  try:
    params = handler.restore(directory, args=ocp.args.StandardRestore(_host_targets(handler.metadata(directory).tree)))
  except (KeyError, TypeError, ValueError, FileNotFoundError, OSError) as e:
    raise LlavaJaxError(f"{params_dir}: cannot restore the Orbax checkpoint: {' '.join(str(e).split())[:200]}") from None
  return _unwrap(params)


def check_params(params: dict, config: LlavaConfig, source: str) -> None:
  """Every parameter the config needs is there with its shape, and nothing else is."""
  expected = _expected_shapes(config)
  found = dict(_flatten(params))
  for path, shape in expected.items():
    if path not in found:
      raise LlavaJaxError(f"{source}: missing parameter {path}")
    if tuple(found[path].shape) != shape:
      raise LlavaJaxError(f"{source}: parameter {path} has shape {tuple(found[path].shape)}, expected {shape}")
  for path in found:
    if path not in expected:
      raise LlavaJaxError(f"{source}: unexpected parameter {path} (not part of this config's model)")


def _expected_shapes(config: LlavaConfig) -> dict[str, tuple[int, ...]]:
  if config.lora is not None:  # adapters and quantized kernels beside the mapped tensors: the model's own shapes
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    from llava_jax.models.llava import abstract_params  # pylint: disable=import-outside-toplevel
    return {path: tuple(x.shape) for path, x in _flatten(nn.unbox(abstract_params(config)))}
  expected = {}
  for rule in mapping.rules(config):
    layers = (mapping.layer_count(rule, config),) if rule.stacked else ()
    expected[rule.path] = layers + rule.shape
  return expected


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _flatten(value, path + "/")
    else:
      yield path, value


def read_meta(folder: str) -> hf.HFSource:
  path = os.path.join(folder, META_FILE)
  if not os.path.isfile(path):
    return hf.HFSource(config_from_hf=False)
  try:
    with open(path) as f:
      section = json.load(f).get("hf") or {}
    return hf.HFSource(layout=section.get("layout", "saved"), dtypes=dict(section.get("dtypes") or {}),
                       config_from_hf=bool(section.get("config_from_hf", False)))
  except (OSError, ValueError, AttributeError) as e:
    raise LlavaJaxError(f"{path}: unreadable ({e})") from None


def _write_meta(folder: str, source: hf.HFSource) -> None:
  meta = {"format": FORMAT, "version": 1, "hf": dataclasses.asdict(source)}
  with open(os.path.join(folder, META_FILE), "w") as f:
    f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def write_checkpoint(folder: str, config: LlavaConfig, params: dict, assets_dir: str | None = None,
                     source: hf.HFSource | None = None, config_json: str | None = None) -> None:
  """Fills the existing, empty `folder` (see the module docstring). Params are saved as they are:
  no dtype change, no extra copy."""
  import orbax.checkpoint as ocp
  check_params(params, config, "params")
  source = source or hf.HFSource(config_from_hf=False)
  if assets_dir:
    hf.copy_assets(assets_dir, folder)
  if config_json and source.config_from_hf:
    hf.copy_config(config_json, os.path.join(folder, "config.json"))
  else:
    save_config(config, folder)
  _write_meta(folder, source)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(os.path.abspath(folder), PARAMS_DIR), params)
    checkpointer.wait_until_finished()


def save_checkpoint_folder(out: str, config: LlavaConfig, params: dict, assets_dir: str | None = None,
                           overwrite: bool = False) -> str:
  """Writes a llava-jax checkpoint folder at `out`, atomically (for the trainer's export and the demo).

  `assets_dir` is a folder whose tokenizer/processor/chat-template files are copied along.
  """
  with atomic_output_dir(out, overwrite=overwrite) as tmp:
    write_checkpoint(tmp, config, params, assets_dir)
  return out


def to_numpy_tree(params: dict) -> dict:
  """Host numpy views of a parameter tree (zero-copy for CPU arrays)."""
  return jax.tree.map(np.asarray, params)
