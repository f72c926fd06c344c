"""The same LLaVA JSON + image folder packed as a TFDS dataset (array_record; no TensorFlow needed).

Each example keeps the record as written (JSON text), its position in the file, and the bytes of
its image files exactly as stored on disk (b"" for a file that was missing), so reading it back
through `data.source=tfds` goes through the very same validation, decoding and skip reasons as
`data.source=json`. Examples stay in file order (shuffling is the pipeline's job), hence the
same per-host shards and the same batches from either source.

Build it with `build(json_path, image_folder, data_dir)`; the pipeline builds it on first use
when `data.tfds_dir` holds no prepared dataset (on multi-host runs, build it once beforehand).
A prepared dataset is not rebuilt when the JSON changes: delete the folder to rebuild.
"""

from __future__ import annotations

import json
import os

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from llava_jax.data import llava_json
from llava_jax.errors import LlavaJaxError

NAME = "llava_json"
SPLIT = "train"


class LlavaJson(tfds.core.GeneratorBasedBuilder):
  """LLaVA-format instruction data with its images embedded as encoded bytes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Records as JSON text, images as the original file bytes."}

  # TFDS finds a builder's source file through importlib_resources, which the pinned stack lacks
  # (it is a TensorFlow-era dependency); say where we are instead.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, json_path: str = "", image_folder: str = "", **kwargs):
    self._json_path, self._image_folder = json_path, image_folder
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="LLaVA JSON records (as JSON text) with the bytes of their image files.",
        features=tfds.features.FeaturesDict({
            "record": tfds.features.Text(),
            "index": tfds.features.Scalar(dtype=np.int64),
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        }),
        disable_shuffling=True,  # keep file order: the pipeline shuffles, seeded
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    if not self._json_path:
      raise LlavaJaxError(f"tfds: {NAME} can only be built from a LLaVA JSON file (data.json)")
    return {SPLIT: self._generate_examples(llava_json.load_llava_json(self._json_path))}

  def _generate_examples(self, source):
    for i in range(len(source)):
      item = source[i]
      record = item["record"]
      names = llava_json.image_names(record) if isinstance(record, dict) else None
      images = [_file_bytes(os.path.join(self._image_folder, name)) for name in names or ()]
      yield item["index"], {"record": json.dumps(record, ensure_ascii=False),
                            "index": item["index"], "images": images}


def _file_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError:
    return b""  # missing or unreadable: skipped as missing_image when read


def default_data_dir(json_path: str) -> str:
  return os.path.splitext(json_path)[0] + "_tfds"


def is_prepared(data_dir: str) -> bool:
  return os.path.isfile(os.path.join(data_dir, NAME, str(LlavaJson.VERSION), "dataset_info.json"))


def build(json_path: str, image_folder: str, data_dir: str) -> str:
  """Packs `json_path` + `image_folder` into `data_dir` (array_record); returns data_dir."""
  tfds.disable_progress_bar()
  builder = LlavaJson(json_path=json_path, image_folder=image_folder, data_dir=data_dir,
                      file_format="array_record")
  builder.download_and_prepare()
  return data_dir


def open_source(data_dir: str, json_path: str = "", image_folder: str = ""):
  """The prepared dataset's random-access source (built first from `json_path` if absent)."""
  if not is_prepared(data_dir):
    if not json_path:
      raise LlavaJaxError(f"data.tfds_dir: {data_dir}: no prepared {NAME} dataset (and no data.json to build it from)")
    build(json_path, image_folder, data_dir)
  return tfds.data_source(NAME, split=SPLIT, data_dir=data_dir, download=False)


def decode_record(element: dict) -> dict:
  """A stored example -> the pipeline's raw element (as RecordSource yields, plus image bytes)."""
  text = element["record"]
  text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
  return {"record": json.loads(text), "index": int(element["index"]),
          "images": [bytes(b) for b in element["images"]]}
