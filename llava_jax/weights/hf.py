"""Hugging Face model folders: lazy tensor reads, sharded safetensors writes, asset files.

Reading never loads a whole file: safetensors are memory-mapped by `safe_open` and copied out one
tensor at a time; `.bin` files go through `torch.load(weights_only=True, mmap=True)`. Writing
assigns tensors to shards from their shapes alone, then materializes one shard at a time, so a
conversion holds the model once plus one shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

from llava_jax.config import LlavaConfig, load_config
from llava_jax.errors import LlavaJaxError
from llava_jax.weights import mapping

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
GENERATION_CONFIG = "generation_config.json"

# Files that travel with the weights in every direction (tokenizer, processor, chat template).
ASSET_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "preprocessor_config.json",
    "processor_config.json", "chat_template.jinja", "chat_template.json", GENERATION_CONFIG,
)

# Non-parameter buffers some exporters include; they are safe to drop.
IGNORABLE = re.compile(r"(\.position_ids|rotary_emb\.inv_freq)$")


# ---- reading ------------------------------------------------------------------------------------


def _truncation_detail(path: str) -> str:
  """Says which tensor a damaged safetensors file cuts off, so the error can name the key."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if 8 + n > size:
        return f"header of {n} bytes does not fit in the {size}-byte file"
      header = json.loads(f.read(n))
  except (OSError, ValueError, struct.error) as e:
    return f"unreadable header ({e})"
  for key, info in header.items():
    if key != "__metadata__" and 8 + n + info["data_offsets"][1] > size:
      return f"tensor {key} ends at byte {8 + n + info['data_offsets'][1]} but the file has {size} bytes"
  return "inconsistent header"


def _open_safetensors(path: str):
  from safetensors import SafetensorError, safe_open
  try:
    return safe_open(path, framework="numpy")  # numpy handles BF16 via ml_dtypes (safetensors>=0.6)
  except (SafetensorError, OSError) as e:
    detail = _truncation_detail(path) if os.path.isfile(path) else str(e)
    raise LlavaJaxError(f"{path}: truncated or corrupt safetensors file: {detail}") from None


def _torch_to_numpy(tensor) -> np.ndarray:
  import torch
  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:  # numpy has no bf16; reinterpret the bits
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


class TensorFolder:
  """Lazy name -> numpy access to the weights of a folder (safetensors preferred, else `.bin`).

  `read(name)` raises KeyError for a name the folder does not hold.
  """

  def __init__(self, folder: str, files: Sequence[str] = ()):
    """`files`: read exactly these files of `folder` (each must exist) instead of looking for the model's weights."""
    self.folder = folder
    self._where: dict[str, str] = {}  # tensor name -> file name
    self._open: dict[str, object] = {}
    self.listing = folder  # the file that says which tensors exist (index or single file), for messages
    if files:
      for file in files:
        self._add_file(file)
    elif os.path.isfile(os.path.join(folder, SAFE_INDEX)):
      self._from_index(SAFE_INDEX)
    elif os.path.isfile(os.path.join(folder, SAFE_WEIGHTS)):
      self._add_file(SAFE_WEIGHTS)
    elif os.path.isfile(os.path.join(folder, BIN_INDEX)):
      self._from_index(BIN_INDEX)
    elif os.path.isfile(os.path.join(folder, BIN_WEIGHTS)):
      self._add_file(BIN_WEIGHTS)
    else:
      raise LlavaJaxError(f"{folder}: no weights ({SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX})")

  def _from_index(self, index_name: str) -> None:
    path = self.listing = os.path.join(self.folder, index_name)
    try:
      with open(path) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise LlavaJaxError(f"{path}: unreadable index ({e!r})") from None
    for file in dict.fromkeys(weight_map.values()):
      if not os.path.isfile(os.path.join(self.folder, file)):
        key = next(k for k, v in weight_map.items() if v == file)
        raise LlavaJaxError(f"{path}: shard {file} (holding {key}) is missing")
      self._add_file(file)
    for key, file in weight_map.items():
      if key not in self._where:
        raise LlavaJaxError(f"{os.path.join(self.folder, file)}: tensor {key} listed in {index_name} is not in the file")

  def _add_file(self, file: str) -> None:
    path = os.path.join(self.folder, file)
    if not self._open:
      self.listing = path if self.listing == self.folder else self.listing
    if file.endswith(".safetensors"):
      handle = _open_safetensors(path)
      keys = handle.keys()
    else:
      handle = _load_bin(path)
      keys = handle.keys()
    self._open[file] = handle
    for key in keys:
      self._where[key] = file

  def __contains__(self, name: str) -> bool:
    return name in self._where

  @property
  def names(self) -> list[str]:
    return list(self._where)

  def info(self, name: str) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) from the file header, without reading the data."""
    handle = self._open[self._where[name]]
    if isinstance(handle, dict):
      tensor = handle[name]
      return tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")
    piece = handle.get_slice(name)
    return tuple(piece.get_shape()), _SAFE_DTYPES.get(piece.get_dtype(), piece.get_dtype())

  def file_of(self, name: str) -> str:
    return os.path.join(self.folder, self._where[name])

  def read(self, name: str) -> np.ndarray:
    file = self._where[name]  # KeyError for a missing tensor, as mapping.hf_to_params expects
    handle = self._open[file]
    if isinstance(handle, dict):
      return _torch_to_numpy(handle[name])
    try:
      return handle.get_tensor(name)
    except Exception as e:  # a header that passed but data that does not
      raise LlavaJaxError(f"{os.path.join(self.folder, file)}: cannot read tensor {name}: {e}") from None


_SAFE_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _load_bin(path: str) -> dict:
  import pickle

  import torch
  try:  # weights_only: plain tensors and containers, never arbitrary objects
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
    raise LlavaJaxError(f"{path}: cannot load as a weights-only PyTorch file: {' '.join(str(e).split())[:200]}") from None
  if not isinstance(state, dict):
    raise LlavaJaxError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
  return state


@dataclasses.dataclass
class HFSource:
  """What a round trip back to HF needs to know about where the weights came from."""
  layout: str = "saved"  # one of mapping.LAYOUTS
  dtypes: dict[str, str] = dataclasses.field(default_factory=dict)  # canonical HF name -> dtype
  config_from_hf: bool = True  # config.json is the source's own file (copy it verbatim)


def read_hf_llava(folder: str) -> tuple[LlavaConfig, dict, HFSource]:
  """Reads an HF LLaVA folder: config, our parameter tree (stored dtypes) and its round-trip record."""
  if not os.path.isdir(folder):
    raise LlavaJaxError(f"{folder}: no such model folder")
  config = load_config(folder)
  weights = TensorFolder(folder)
  layout = mapping.detect_layout(weights.names)
  expected = mapping.expected_hf_names(config, layout)
  _check_unexpected(weights, expected, config)
  dtypes = {}

  def read(name):
    value = weights.read(name)
    dtypes[name] = str(value.dtype)
    return value

  try:
    params = mapping.hf_to_params(read, config, layout, source=weights.listing)
  except LlavaJaxError as e:
    raise LlavaJaxError(_name_shard(str(e), weights)) from None
  canonical = dict(zip(expected, mapping.expected_hf_names(config)))
  return config, params, HFSource(layout, {canonical[n]: d for n, d in dtypes.items()})


def _name_shard(message: str, weights: TensorFolder) -> str:
  """Rewrites "folder: tensor X ..." to name the shard file that holds X."""
  match = re.search(r"tensor (\S+)", message)
  if match and match.group(1) in weights:
    return f"{weights.file_of(match.group(1))}: " + message.split(": ", 1)[1]
  return message


def _check_unexpected(weights: TensorFolder, expected: list[str], config: LlavaConfig) -> None:
  wanted = set(expected)
  for name in weights.names:
    if name in wanted or IGNORABLE.search(name):
      continue
    if config.text.tie_word_embeddings and name.endswith("lm_head.weight"):
      continue  # some exporters write the tied head anyway
    raise LlavaJaxError(f"{weights.file_of(name)}: unexpected tensor {name} (not part of this config's model)")


# ---- writing ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  shape: tuple[int, ...]
  dtype: np.dtype
  make: Callable[[], np.ndarray]  # materializes the tensor (called once, when its shard is written)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def natural_key(name: str):
  """transformers' save order: dotted parts, numbers compared as numbers (layers.2 < layers.10)."""
  return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
  """Greedy split in key order, as huggingface_hub does: a tensor that would overflow the current
  shard starts a new one; a tensor larger than the limit gets a shard of its own."""
  shards: list[list[str]] = []
  current: list[str] = []
  used = 0
  for name, size in sizes.items():
    if size > max_bytes:
      shards.append([name])
      continue
    if current and used + size > max_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(name)
    used += size
  if current:
    shards.append(current)
  return shards


def write_tensors(out: str, tensors: dict[str, TensorSpec], max_shard_bytes: int) -> None:
  """Writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus the index, into `out`."""
  from safetensors.numpy import save_file
  order = sorted(tensors, key=natural_key)
  shards = plan_shards({n: tensors[n].nbytes for n in order}, max_shard_bytes)
  files = [SAFE_WEIGHTS] if len(shards) == 1 else [
      f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for file, names in zip(files, shards):
    data = {}
    for name in names:
      spec = tensors[name]
      value = np.ascontiguousarray(spec.make(), dtype=spec.dtype)
      if value.shape != spec.shape:  # a bug, not bad input: the plan and the data disagree
        raise AssertionError(f"{name}: made {value.shape}, planned {spec.shape}")
      data[name] = value
      weight_map[name] = file
    save_file(data, os.path.join(out, file), metadata={"format": "pt"})
    del data
  if len(shards) > 1:
    index = {"metadata": {"total_parameters": sum(int(np.prod(t.shape, dtype=np.int64)) for t in tensors.values()),
                          "total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    with open(os.path.join(out, SAFE_INDEX), "w", encoding="utf-8") as f:
      f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def param_tensors(params: dict, config: LlavaConfig, layout: str = "saved", dtypes: dict[str, str] | None = None,
                  dtype: str | None = None) -> dict[str, TensorSpec]:
  """Our parameter tree as HF tensor specs, without materializing anything.

  Each tensor's dtype is `dtype` when given, else its recorded source dtype, else the parameter's.
  """
  dtypes = dtypes or {}
  specs = {}
  for rule in mapping.rules(config):
    _, backward = mapping.TRANSFORMS[rule.transform]
    leaf = _leaf(params, rule.path)
    full = np.asarray(leaf)  # zero-copy for host (CPU) jax arrays and numpy
    expected = ((mapping.layer_count(rule, config),) if rule.stacked else ()) + rule.shape
    if full.shape != expected:
      raise LlavaJaxError(f"params: {rule.path} has shape {full.shape}, expected {expected} for this config")
    hf_shape = tuple(backward(np.empty(rule.shape, np.uint8)).shape)
    for i, canonical in enumerate(mapping.hf_names(rule, config)):
      dt = np.dtype(np_dtype(dtype or dtypes.get(canonical) or str(full.dtype)))
      layer = (lambda full=full, i=i: full[i]) if rule.stacked else (lambda full=full: full)
      specs[mapping.to_layout(canonical, layout)] = TensorSpec(
          hf_shape, dt, lambda layer=layer, backward=backward, dt=dt: backward(layer()).astype(dt, copy=False))
  return specs


def np_dtype(name: str):
  return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _leaf(tree: dict, path: str):
  for part in path.split("/"):
    if not isinstance(tree, dict) or part not in tree:
      raise LlavaJaxError(f"params: missing parameter {path}")
    tree = tree[part]
  return tree


def write_hf_llava(out: str, config: LlavaConfig, params: dict, source: HFSource | None = None,
                   config_json: str | None = None, assets_dir: str | None = None, dtype: str | None = None,
                   max_shard_bytes: int = 5 * 10**9) -> None:
  """Writes an HF LLaVA folder into the existing folder `out` (the caller makes it atomic).

  config.json is `config_json` copied verbatim when the source's config came from HF (only its
  "dtype" changes when the tensors are written in another dtype), else written from `config`.
  """
  source = source or HFSource(config_from_hf=False)
  specs = param_tensors(params, config, source.layout, source.dtypes, dtype)
  write_tensors(out, specs, max_shard_bytes)
  if config_json and source.config_from_hf and os.path.isfile(config_json):
    written = {str(np.dtype(s.dtype)) for s in specs.values()}
    copy_config(config_json, os.path.join(out, "config.json"), written.pop() if len(written) == 1 else None)
  else:
    from llava_jax.config import save_config
    save_config(config, out)
  if assets_dir:
    copy_assets(assets_dir, out)


def copy_config(src: str, dst: str, dtype: str | None = None) -> None:
  """Copies config.json verbatim, unless its recorded "dtype" differs from the weights written."""
  with open(src) as f:
    d = json.load(f)
  sections = [x for x in (d, d.get("text_config"), d.get("vision_config")) if isinstance(x, dict)]
  stale = [(x, k) for x in sections for k in ("dtype", "torch_dtype") if dtype and k in x and x[k] != dtype]
  if not stale:
    shutil.copyfile(src, dst)
    return
  for section, key in stale:
    section[key] = dtype
  with open(dst, "w") as f:
    f.write(json.dumps(d, indent=2, sort_keys=True) + "\n")


def copy_assets(src: str, dst: str, names: Iterable[str] = ASSET_FILES) -> list[str]:
  """Copies whichever tokenizer/processor/template files `src` has; returns their names."""
  copied = []
  for name in names:
    path = os.path.join(src, name)
    if os.path.isfile(path):
      shutil.copyfile(path, os.path.join(dst, name))
      copied.append(name)
  return copied
