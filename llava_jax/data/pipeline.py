"""The training input pipeline (grain): records -> shuffled epochs -> preprocessed samples ->
length-bucketed batches -> global `jax.Array`s for the mesh.

    records (this host's share) -> shuffle(seed, new order each epoch) -> repeat forever
      -> Preprocess (parse, template + tokenize + mask, decode + image layout)       [worker processes]
      -> BucketedBatches (skip + count unusable samples, pad kept ones to buckets)  [main process]
         (with data.packing, several samples per row: data/packing.py)

Each `<image>` becomes the image tokens its image gives under the sample's image layout (data/layouts.py's
prompt_layout): a fixed count for LLaVA-1.5, one by image size for AnyRes (LLaVA-NeXT), whose rows then carry the
feature index that tells the model which feature each image token takes. LLaVA-OneVision tiles a sample's lone
image (anyres_max_N: a downscaled grid blends up to MIX_TAPS features per token, so its feature index has a tap
axis and the rows carry the taps' weights) and gives each of several images one tile and a newline. A video sample
(a `video` field, LLaVA-Video's format) becomes its video's tokens and frames as inference makes them
(data/video_samples.py), for a video model (else a counted skip).

Determinism: every stage before the batcher is a random-access `MapDataset`, so element i is
the same whatever the worker count, and grain interleaves workers round-robin in index order:
N workers give exactly the batches of 0 workers. Unusable samples travel as `Skipped` markers
(not filtered out) so every worker yields every index and that order holds. The iterator state
(`get_state`/`set_state`, JSON-serializable) is grain's position plus the skip counters, so a
resumed run continues with exactly the next batch. A packed batch ends at the first sample that fits in none
of its rows; that sample opens the next batch, and the saved position is the one before it, so a resumed
run reads it again.

Workers are spawned processes: scripts that use `data.num_workers > 0` need an
`if __name__ == "__main__":` guard, and grain reads absl flags, so `make_pipeline` marks them
parsed when the program did not parse them itself (absl.app.run does).

Batch (host-local numpy, B = global batch / process count):
    input_ids      int32   (B, S)  right-padded with the pad id; S is one of the length buckets
    attention_mask int32   (B, S)  1 on real tokens; packed: the segment id k of the row's k-th sample
    loss_mask      float32 (B, S)  1.0 where input_ids[:, t] is a target (predicted from t - 1)
    pixel_values   float32 (B, M, H, W, 3)  the row's tiles (LLaVA-1.5: one per image), then zeros; M is
                   data.max_tiles for the fixed layout unpacked, else one of the tile buckets
    image_feature_index int32 (B, S)  AnyRes layouts only: the row's k-th image token takes feature [b, k]
                   of its tiles' features (-1: image_newline); zeros past the row's image tokens.
                   OneVision: (B, S, MIX_TAPS), the features token k blends
    image_feature_weights float32 (B, S, MIX_TAPS)  OneVision only: their weights (image_tokens.FeatureMix)
    skipped        int64   ()      unusable samples met so far on this host (running count)
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import grain.python as grain
import numpy as np

from llava_jax.data import images as images_lib
from llava_jax.data import layouts, llava_json, packing, templates
from llava_jax.data.llava_json import Skipped, SkipReason
from llava_jax.data.video_samples import VideoSamples
from llava_jax.errors import LlavaJaxError
from llava_jax.image_tokens import as_mix, check_image_tokens

logger = logging.getLogger("llava_jax.data")

MODEL_KEYS = ("input_ids", "attention_mask", "loss_mask", "pixel_values")
FEATURE_INDEX, FEATURE_WEIGHTS = layouts.FEATURE_INDEX, layouts.FEATURE_WEIGHTS


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `data.*` config keys (see `from_config` for how they are read)."""
  json: str = ""                 # LLaVA JSON/JSONL file (source=json; also what source=tfds packs)
  image_folder: str = ""         # folder the `image` paths are relative to
  video_folder: str = ""         # folder the `video` paths are relative to (video files or frames folders)
  num_frames: int = 0            # frames sampled per video; 0 = the model folder's (data/video_io.num_frames_for)
  template: str = "vicuna_v1"    # one of templates.TEMPLATE_NAMES
  max_len: int = 2048            # tokens per sample, image tokens included; longer samples skipped
  max_images: int = 1            # images per sample; samples with more are skipped
  max_tiles: int = 0             # tower inputs per row (M); 0 = see default_max_tiles
  buckets: Tuple[int, ...] = ()  # padded sequence lengths; () = default_buckets(max_len)
  source: str = "json"           # json | tfds
  tfds_dir: str = ""             # TFDS data_dir (source=tfds); built from `json` when empty
  num_workers: int = 0           # grain worker processes (0 = preprocess in this process)
  worker_buffer: int = 2         # samples each worker prefetches
  read_threads: int = 4          # threads per process reading/preprocessing samples
  image_aspect_ratio: str = ""   # "" = the model folder's processor; "pad" (LLaVA-1.5) | "square"
  max_pixels: int = images_lib.DEFAULT_MAX_PIXELS  # decompression-bomb limit per image
  shuffle: bool = True
  packing: bool = False          # several samples per row, first fit in pipeline order (data/packing.py)

  @classmethod
  def from_config(cls, data: Any) -> "DataConfig":
    """From the `data` ConfigDict (or a dict); absent keys keep their defaults, others are ignored."""
    get = data.get if hasattr(data, "get") else lambda k, d=None: getattr(data, k, d)
    values = {}
    for field in dataclasses.fields(cls):
      value = get(field.name, None)
      if value is None:
        continue
      if field.name == "buckets":
        value = tuple(int(b) for b in value)
      values[field.name] = value
    config = cls(**values)
    config.validate()
    return config

  def validate(self) -> None:
    templates.check_template(self.template)
    if self.source not in ("json", "tfds"):
      raise LlavaJaxError(f"data.source: expected 'json' or 'tfds', got {self.source!r}")
    if self.source == "json" and not self.json:
      raise LlavaJaxError("data.json: no training data file given")
    if self.source == "tfds" and not (self.tfds_dir or self.json):
      raise LlavaJaxError("data.tfds_dir: source=tfds needs data.tfds_dir (or data.json to build it from)")
    for key in ("max_len", "max_images", "max_tiles", "worker_buffer", "read_threads", "num_frames"):
      if int(getattr(self, key)) < (0 if key in ("max_images", "max_tiles", "num_frames") else 1):
        raise LlavaJaxError(f"data.{key}: must be positive, got {getattr(self, key)}")
    if self.num_workers < 0:
      raise LlavaJaxError(f"data.num_workers: must be >= 0, got {self.num_workers}")
    if self.image_aspect_ratio not in ("", "pad", "square"):
      raise LlavaJaxError(f"data.image_aspect_ratio: expected '', 'pad' or 'square', got {self.image_aspect_ratio!r}")


def _quarter_half_all(limit: int, multiple: int) -> Tuple[int, ...]:
  return tuple(sorted({min(limit, multiple * math.ceil(limit * f / multiple)) for f in (0.25, 0.5, 1.0)}))


def default_buckets(max_len: int) -> Tuple[int, ...]:
  """A quarter, a half and all of max_len, rounded up to multiples of 64: a few compiled shapes."""
  return _quarter_half_all(max_len, 64)


def tile_buckets(max_tiles: int, by_size: bool) -> Tuple[int, ...]:
  """Padded tile counts: always max_tiles for the fixed layout (every batch keeps one shape), else a quarter,
  a half and all of it, as the length buckets (a row's tiles vary with its images' sizes)."""
  return _quarter_half_all(max_tiles, 1) if by_size else (max_tiles,)


def default_max_tiles(layout: layouts.ImageLayout, max_images: int, max_len: int, packing: bool) -> int:
  """Tower inputs per row when data.max_tiles is 0: one sample's most (max_images x the layout's most per image);
  packed, at least as many tiles as max_len image tokens take, so that a row can hold several image samples."""
  most = max_images * layouts.max_tiles_per_image(layout)
  return max(most, max_len // layout.tokens_per_tile) if packing else most


def resolve_buckets(buckets: Sequence[int], max_len: int) -> Tuple[int, ...]:
  kept = sorted({int(b) for b in buckets if 0 < int(b) < max_len})
  return tuple(kept) + (max_len,) if buckets else default_buckets(max_len)


class Preprocess(grain.MapTransform):
  """Raw record -> padded-free training example (dict of numpy arrays), or a `Skipped` marker.

  Cheap checks come first (structure, image count, length) so bad samples cost no decoding, except
  where the image layout needs the images' sizes to count their tokens (AnyRes).
  """

  def __init__(self, template: str, tokenizer, image_processor: images_lib.ImageProcessor,
               layout: layouts.ImageLayout, max_len: int, max_images: int, image_folder: str = "",
               max_pixels: int = images_lib.DEFAULT_MAX_PIXELS, image_token: str = templates.IMAGE_TAG,
               max_tiles: int = 0, video_folder: str = "", videos: Optional[VideoSamples] = None):
    self.template = templates.check_template(template)
    self.backend = templates.backend_tokenizer(tokenizer)  # pickles small, thread-safe encode
    self.bos = getattr(tokenizer, "bos_token", None) or ""
    self.eos = getattr(tokenizer, "eos_token", None) or "</s>"
    self.image_token = image_token
    self.image_token_id = self.backend.token_to_id(image_token)
    if self.image_token_id is None or len(self.backend.encode(image_token, add_special_tokens=False).ids) != 1:
      raise LlavaJaxError(f"tokenizer: image token {image_token!r} is not a single token (add it as a special token)")
    self.image_processor, self.layout = image_processor, layout
    self.by_size = layouts.orders_features_by_size(layout)
    self.mixes = layouts.mixes_features(layout)
    self.max_len, self.max_images = max_len, max_images
    self.max_tiles = max_tiles or max_images * layouts.max_tiles_per_image(layout)
    self.image_folder, self.max_pixels = image_folder, max_pixels
    self.video_folder, self.videos = video_folder, videos  # videos: None for a model that takes none

  def map(self, element: dict):
    sample = llava_json.parse_sample(element["record"], element["index"], self.image_folder,
                                     element.get("images"), self.video_folder)
    if isinstance(sample, Skipped):
      return sample
    if sample.video is not None:
      if self.videos is None:
        return Skipped(sample.id, SkipReason.VIDEO, f"{sample.video}: this model takes no videos")
      return self.videos.example(sample, self)
    n_images = len(sample.images)
    if n_images > self.max_images:
      return Skipped(sample.id, SkipReason.TOO_MANY_IMAGES, f"{n_images} images > data.max_images {self.max_images}")
    pil_images = llava_json.read_images(sample, self.max_pixels) if self.by_size else None
    if isinstance(pil_images, Skipped):
      return pil_images
    # The fixed layout ignores sizes: its samples are decoded only once they passed the checks below.
    sizes = [(p.height, p.width) for p in pil_images] if self.by_size else [None] * n_images
    names = layouts.image_labels(sample.images)
    layout = layouts.prompt_layout(self.layout, n_images)
    try:
      counts = [layout.num_image_tokens(size, name) for size, name in zip(sizes, names)]
      tiles = sum(layout.tiles(size, name) for size, name in zip(sizes, names))
    except LlavaJaxError as e:  # e.g. an image smaller than one patch
      return Skipped(sample.id, SkipReason.CORRUPT_IMAGE, str(e))
    if tiles > self.max_tiles:
      return Skipped(sample.id, SkipReason.TOO_MANY_IMAGES,
                     f"{n_images} image(s) give {tiles} tiles > data.max_tiles {self.max_tiles}")
    input_ids, loss_mask = self.encode(sample.turns, counts)
    if len(input_ids) > self.max_len:
      return Skipped(sample.id, SkipReason.TOO_LONG,
                     f"{len(input_ids)} tokens (with {sum(counts)} image tokens) > data.max_len {self.max_len}")
    try:
      check_image_tokens(input_ids, self.image_token_id, sum(counts), f"sample {sample.id}")
    except LlavaJaxError as e:  # the tokenizer merged or split image tokens
      return Skipped(sample.id, SkipReason.IMAGE_COUNT, str(e))
    if pil_images is None:
      pil_images = llava_json.read_images(sample, self.max_pixels)
      if isinstance(pil_images, Skipped):
        return pil_images
    try:
      pixel_values = layouts.images_pixels(layout, pil_images, self.image_processor, names)
    except (LlavaJaxError, OSError, ValueError) as e:  # decoded, yet unusable (e.g. a 1x0 image)
      return Skipped(sample.id, SkipReason.CORRUPT_IMAGE, f"{type(e).__name__}: {e}")
    example = {"id": sample.id, "input_ids": input_ids, "loss_mask": loss_mask, "pixel_values": pixel_values}
    if self.by_size:
      return self.with_feature_index(example, layouts.images_feature_index(layout, sizes, names))
    return example

  def with_feature_index(self, example: dict, index) -> dict:
    """The example with its feature index: a mixing layout's as the taps' index and weights."""
    if self.mixes:  # every sample of a mixing layout carries weights (text-only ones too): rows stack
      index = as_mix(index)
      example[FEATURE_WEIGHTS] = index.weights
      index = index.index
    example[FEATURE_INDEX] = index
    return example

  def encode(self, turns: Sequence[Tuple[str, str]], counts: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Tokens and loss mask of the conversation, the i-th `<image>` expanded to counts[i] image tokens."""
    expanded, done = [], 0
    for role, text in turns:
      tags = text.count(templates.IMAGE_TAG)
      expanded.append((role, layouts.expand_image_tags(text, templates.IMAGE_TAG, self.image_token,
                                                       counts[done:done + tags])))
      done += tags
    rendered = templates.render(self.template, expanded, self.bos, self.eos)
    input_ids, loss_mask = templates.tokenize(rendered, self.backend, self.image_token_id)
    loss_mask[:1] = 0.0  # nothing predicts the first token (matters for tokenizers without BOS)
    return input_ids, loss_mask


class BucketedBatches(grain.IterDataset):
  """Skips and counts `Skipped` markers, and pads the kept samples into batches of a length bucket (and a
  tile bucket): a few fixed shapes, so the train step compiles a few times. With `packing`, each row takes
  samples while they fit in the largest buckets (data/packing.py), else one sample."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, buckets: Sequence[int], tile_buckets: Sequence[int],
               pad_id: int, tile_hw: Tuple[int, int], records_per_epoch: int, name: str,
               packing: bool = False, tokens_per_tile: int = 0):
    super().__init__(parent)
    self.batch_size, self.pad_id = batch_size, pad_id
    self.buckets, self.tile_buckets = tuple(buckets), tuple(tile_buckets)
    self.tile_hw = tuple(tile_hw)
    self.records_per_epoch, self.name = records_per_epoch, name
    self.packing, self.tokens_per_tile = packing, tokens_per_tile

  def new_rows(self) -> packing.FirstFitRows:
    return packing.FirstFitRows(self.batch_size, self.buckets[-1], self.tile_buckets[-1],
                                None if self.packing else 1)

  def __iter__(self):
    return BucketedBatchIterator(self._parent.__iter__(), self)

  def __str__(self):
    return (f"BucketedBatches(batch_size={self.batch_size}, buckets={self.buckets}, tile_buckets={self.tile_buckets}, "
            f"packing={self.packing})")


class BucketedBatchIterator(grain.DatasetIterator):

  def __init__(self, parent, spec: BucketedBatches):
    super().__init__(parent)
    self.spec = spec
    self.skip_counts: Dict[str, int] = collections.Counter()
    self.consecutive_skips = 0
    # A packed batch's first sample, read by the batch before it (where it fit in no row), and the parent's
    # position before reading it: what get_state saves, so that a resumed run reads it again.
    self.pending: Optional[Tuple[dict, Any]] = None

  def __next__(self) -> Dict[str, np.ndarray]:
    rows = self.spec.new_rows()
    if self.pending is not None:
      rows.place(self.pending[0])  # every kept sample fits an empty row (longer ones were skipped)
      self.pending = None
    while not rows.full():
      position = copy.deepcopy(self._parent.get_state()) if self.spec.packing else None
      element = next(self._parent)
      if isinstance(element, Skipped):
        self._skip(element)
        continue
      self.consecutive_skips = 0
      if not rows.place(element):
        self.pending = (element, position)
        break
    return self._collate(rows.rows)

  def _skip(self, skipped: Skipped) -> None:
    reason = SkipReason(skipped.reason).value
    self.skip_counts[reason] += 1
    self.consecutive_skips += 1
    logger.warning("skipping sample %s: %s: %s", skipped.id, reason, skipped.detail)
    # A whole epoch without one usable sample would loop forever: that is bad input, exit 2.
    if self.consecutive_skips >= self.spec.records_per_epoch:
      counts = ", ".join(f"{k}={v}" for k, v in sorted(self.skip_counts.items()))
      raise LlavaJaxError(f"{self.spec.name}: no usable sample in {self.spec.records_per_epoch} "
                          f"consecutive samples ({counts})")

  def _collate(self, samples_by_row) -> Dict[str, np.ndarray]:
    spec = self.spec
    rows = [packing.pack_row(samples, spec.tokens_per_tile) for samples in samples_by_row]
    length = next(b for b in spec.buckets if b >= max(len(r["input_ids"]) for r in rows))
    tiles = next(b for b in spec.tile_buckets if b >= max(len(r["pixel_values"]) for r in rows))
    n = spec.batch_size
    batch = {
        "input_ids": np.full((n, length), spec.pad_id, np.int32),
        "attention_mask": np.zeros((n, length), np.int32),
        "loss_mask": np.zeros((n, length), np.float32),
        "pixel_values": np.zeros((n, tiles) + spec.tile_hw + (3,), np.float32),
    }
    index_keys = [key for key in (FEATURE_INDEX, FEATURE_WEIGHTS) if key in rows[0]]
    for key in index_keys:  # (n, length) + the row's trailing axes (OneVision's taps)
      batch[key] = np.zeros((n, length) + rows[0][key].shape[1:], rows[0][key].dtype)
    for i, row in enumerate(rows):
      count = len(row["input_ids"])
      batch["input_ids"][i, :count] = row["input_ids"]
      batch["attention_mask"][i, :count] = row["attention_mask"]
      batch["loss_mask"][i, :count] = row["loss_mask"]
      batch["pixel_values"][i, :len(row["pixel_values"])] = row["pixel_values"]
      for key in index_keys:
        batch[key][i, :len(row[key])] = row[key]
    batch["skipped"] = np.asarray(sum(self.skip_counts.values()), np.int64)
    return batch

  def get_state(self) -> dict:
    parent = self._parent.get_state() if self.pending is None else self.pending[1]
    return {"parent": parent, "skipped": dict(self.skip_counts), "consecutive_skips": self.consecutive_skips}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self.pending = None
    self.skip_counts = collections.Counter({k: int(v) for k, v in state["skipped"].items()})
    self.consecutive_skips = int(state["consecutive_skips"])


@dataclasses.dataclass
class Pipeline:
  """`iter(pipeline.dataset)` (or `pipeline.iterator()`) gives checkpointable batches."""
  dataset: grain.IterDataset
  local_batch_size: int
  records: int             # records in this host's share (one epoch, before skips)
  pad_id: int
  buckets: Tuple[int, ...]
  image_processor: images_lib.ImageProcessor  # with data.image_aspect_ratio applied

  @property
  def steps_per_epoch(self) -> int:
    """Batches in one pass over this host's records (skipped samples not yet known)."""
    return max(1, self.records // self.local_batch_size)

  def iterator(self, state: Optional[dict] = None):
    it = iter(self.dataset)
    if state is not None:
      it.set_state(state)
    return it


def _mark_absl_flags_parsed() -> None:
  # grain reads its absl flags when starting workers; outside absl.app.run nobody parsed them.
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _records(config: DataConfig, process_index: int, process_count: int):
  """This host's share of the records as a MapDataset, and a name for messages."""
  if config.source == "json":
    source = llava_json.load_llava_json(config.json).shard(process_index, process_count)
    return grain.MapDataset.source(source), config.json
  from llava_jax.data import tfds_builder  # pylint: disable=import-outside-toplevel  (slow import)
  data_dir = config.tfds_dir or tfds_builder.default_data_dir(config.json)
  source = tfds_builder.open_source(data_dir, config.json, config.image_folder)
  return grain.MapDataset.source(source)[process_index::process_count].map(tfds_builder.decode_record), data_dir


def make_pipeline(config: DataConfig, tokenizer, image_processor: images_lib.ImageProcessor, *,
                  layout: layouts.ImageLayout, global_batch_size: int, seed: int,
                  image_token: str = templates.IMAGE_TAG, image_token_id: Optional[int] = None,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  videos: Optional[VideoSamples] = None) -> Pipeline:
  """Builds the pipeline for this host (`process_index` of `process_count`, default from jax); `videos`: a video
  model's way with video samples."""
  config.validate()
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size % process_count:
    raise LlavaJaxError(f"batch_size: {global_batch_size} is not divisible by the {process_count} processes")
  local_batch = global_batch_size // process_count
  if config.image_aspect_ratio == "pad" and layouts.orders_features_by_size(layout):
    raise LlavaJaxError("data.image_aspect_ratio: 'pad' is LLaVA-1.5's preprocessing; AnyRes (llava_next) "
                        "tiles images itself, use '' (the model folder's processor)")
  if config.image_aspect_ratio:
    image_processor = dataclasses.replace(image_processor, pad_to_square=config.image_aspect_ratio == "pad")
  max_tiles = config.max_tiles or max(default_max_tiles(layout, config.max_images, config.max_len, config.packing),
                                      videos.num_frames if videos else 0)
  preprocess = Preprocess(config.template, tokenizer, image_processor, layout, config.max_len, config.max_images,
                          config.image_folder, config.max_pixels, image_token, max_tiles, config.video_folder, videos)
  if image_token_id is not None and image_token_id != preprocess.image_token_id:
    raise LlavaJaxError(f"tokenizer: {image_token!r} has id {preprocess.image_token_id}, but the model's "
                        f"image_token_index is {image_token_id}")
  records, name = _records(config, process_index, process_count)
  if len(records) == 0:
    raise LlavaJaxError(f"{name}: no samples for process {process_index} of {process_count}")
  ds = records.shuffle(seed % 2**32) if config.shuffle else records
  ds = ds.repeat(None).map(preprocess)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                            prefetch_buffer_size=max(2, 2 * local_batch)))
  if config.num_workers > 0:
    _mark_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                     per_worker_buffer_size=config.worker_buffer))
  pad = getattr(tokenizer, "pad_token_id", None)
  pad_id = int(pad) if pad is not None else 0
  buckets = resolve_buckets(config.buckets, config.max_len)
  # Packed rows hold varying numbers of tiles in either layout.
  row_tiles = tile_buckets(max_tiles, preprocess.by_size or config.packing)
  batches = BucketedBatches(ds, local_batch, buckets, row_tiles, pad_id, image_processor.output_size,
                            len(records), name, config.packing, layout.tokens_per_tile)
  return Pipeline(batches, local_batch, len(records), pad_id, buckets, image_processor)


def make_global_batch(batch: Dict[str, np.ndarray], mesh, pad_id: int = 0, length: Optional[int] = None,
                      tiles: Optional[int] = None) -> Dict[str, Any]:
  """Host-local batch -> global jax.Arrays split over the mesh's batch axes (process order).

  Hosts may have picked different length (and tile) buckets; every host must pass the same `length`
  and `tiles` (the largest of them; default: this batch's own), so all build arrays of the same global shape.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from llava_jax import sharding  # pylint: disable=import-outside-toplevel
  length = batch["input_ids"].shape[1] if length is None else length
  tiles = batch["pixel_values"].shape[1] if tiles is None else tiles
  out = {}
  for key in MODEL_KEYS + tuple(key for key in (FEATURE_INDEX, FEATURE_WEIGHTS) if key in batch):
    value = np.asarray(batch[key])
    target = tiles if key == "pixel_values" else length
    if value.shape[1] < target:
      fill = pad_id if key == "input_ids" else 0
      widths = ((0, 0), (0, target - value.shape[1])) + ((0, 0),) * (value.ndim - 2)
      value = np.pad(value, widths, constant_values=fill)
    out[key] = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, value.ndim), value)
  return out
