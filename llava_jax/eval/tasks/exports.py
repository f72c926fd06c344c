"""lmms-lab's Hugging Face exports of the benchmarks (lmms-lab/POPE, lmms-lab/MME, ...), read from a local folder.

A task's export is found under --data as the lmms-lab repository's name (DATA/POPE, what `huggingface-cli
download lmms-lab/POPE --repo-type dataset --local-dir DATA/POPE` writes: parquet files named
SPLIT-0000i-of-0000n.parquet, under data/ or per config in a folder), or the task's LLaVA folder name holding
such files, or --data itself (a one-config export: its parquet files in it or under data/). A `datasets`
save_to_disk folder (dataset_dict.json / state.json) is read the same way. Rows are read with `datasets`
(memory-mapped); images stay in the dataset until their question is asked.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Sequence

from llava_jax.errors import LlavaJaxError

_SAVED = ("dataset_dict.json", "state.json")  # what Dataset(Dict).save_to_disk writes


def is_export(folder: str, configs: bool = True) -> bool:
  """Whether `folder` holds a save_to_disk dataset or parquet files (directly, under data/, or, with `configs`,
  under any config folder) rather than LLaVA's files."""
  if not os.path.isdir(folder):
    return False
  if any(os.path.exists(os.path.join(folder, f)) for f in _SAVED):
    return True
  files = _parquet_files(folder)
  return any(os.path.dirname(os.path.relpath(f, folder)) in ("", "data") for f in files) or (configs and bool(files))


def _parquet_files(folder: str) -> list[str]:
  """The parquet files of an export: in it, or one folder down (data/ or a config's folder)."""
  return sorted(glob.glob(os.path.join(folder, "*.parquet")) + glob.glob(os.path.join(folder, "*", "*.parquet")))


@dataclasses.dataclass(frozen=True)
class RowImage:
  """The image cell of one row, read when its question is asked (a benchmark's images do not fit in memory)."""
  rows: Any  # the datasets.Dataset
  index: int
  column: str
  name: str  # the image's file name, as LLaVA's files name it (submission files use it)

  def read(self) -> bytes | str:
    cell = self.rows.data.column(self.column)[self.index].as_py()  # the stored {"bytes", "path"}: not decoded
    cell = cell[0] if isinstance(cell, list) else cell  # SEED-Bench: a list of frames, one for images
    if not cell or not (cell.get("bytes") or cell.get("path")):
      raise LlavaJaxError(f"{self.name}: no image in the export's row {self.index}")
    return cell["bytes"] or cell["path"]


class Export:
  """The rows of one (config, split) of an export folder; `records` holds every column but the images."""

  def __init__(self, folder: str, configs: Sequence[str], splits: Sequence[str]):
    self.folder = folder
    self.rows = _load(folder, configs, splits)
    self.images = [c for c, f in self.rows.features.items() if _is_image(f)]
    self.records = self.rows.remove_columns(self.images).to_list()

  def image(self, index: int, name: str, column: str = "image") -> RowImage | None:
    """The row's image (None where the row has none: ScienceQA's text-only questions)."""
    if column not in self.images or not self.rows.data.column(column)[index].is_valid:
      return None
    return RowImage(self.rows, index, column, name)

  def column(self, record: dict, key: str, index: int):
    """record[key], or a LlavaJaxError naming the export and the missing column."""
    if key not in record:
      raise LlavaJaxError(f"{self.folder}: row {index} has no column {key!r} (columns: {', '.join(record)})")
    return record[key]


def _is_image(feature) -> bool:
  import datasets
  feature = getattr(feature, "feature", feature)  # Sequence(Image()) / [Image()]
  feature = feature[0] if isinstance(feature, list) else feature
  return isinstance(feature, datasets.Image)


def _pick(available: Sequence[str], preferred: Sequence[str], what: str, folder: str) -> str:
  """The first preferred name available, else the only one; LlavaJaxError naming the choices otherwise."""
  for name in preferred:
    if name in available:
      return name
  if len(available) == 1:
    return available[0]
  raise LlavaJaxError(f"{folder}: no {what} named {' or '.join(preferred)} (found {', '.join(sorted(available))})")


def _load(folder: str, configs: Sequence[str], splits: Sequence[str]):
  import datasets
  datasets.disable_progress_bars()  # eval prints its own progress
  if any(os.path.exists(os.path.join(folder, f)) for f in _SAVED):
    try:
      loaded = datasets.load_from_disk(folder)
    except Exception as e:  # datasets raises many kinds for a damaged folder
      raise LlavaJaxError(f"{folder}: cannot read the saved dataset ({' '.join(str(e).split())})") from None
    if isinstance(loaded, datasets.DatasetDict):
      loaded = loaded[_pick(list(loaded), splits, "split", folder)]
    return loaded
  by_part: dict[tuple[str, str], list[str]] = {}
  for path in _parquet_files(folder):
    config = os.path.relpath(os.path.dirname(path), folder)
    config = "" if config in (".", "data") else config
    split = os.path.basename(path).split("-")[0].split(".")[0]
    by_part.setdefault((config, split), []).append(path)
  if not by_part:
    raise LlavaJaxError(f"{folder}: no parquet files and no saved dataset")
  config = _pick(sorted({c for c, _ in by_part}), configs, "config folder", folder)
  split = _pick(sorted({s for c, s in by_part if c == config}), splits, "split", folder)
  try:
    loaded = datasets.load_dataset("parquet", data_files=by_part[config, split], split="train")
  except Exception as e:
    raise LlavaJaxError(f"{folder}: cannot read the parquet files ({' '.join(str(e).split())})") from None
  return loaded
