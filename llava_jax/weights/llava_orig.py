"""Import of the original haotian-liu LLaVA release format into a Hugging Face LLaVA or LLaVA-NeXT folder.

The original folder is a LLaMA checkpoint (`model.layers.*`, `model.embed_tokens`, `model.norm`,
`lm_head`) plus `model.mm_projector.0/2.*` (mlp2x_gelu) or `model.mm_projector.*` (linear) and a
config.json with `mm_vision_tower`, `mm_hidden_size`, `mm_vision_select_layer`,
`mm_vision_select_feature` (patch | cls_patch), `mm_projector_type` and `image_aspect_ratio`. The
vision tower comes from a separate CLIP folder (`CLIPVisionModel` or `CLIPModel`, keys
`vision_model.*`), unless the release embeds it (`model.vision_tower.vision_tower.vision_model.*`).

LLaVA-NeXT (llava-v1.6) releases say `mm_patch_merge_type: spatial_unpad` and `image_aspect_ratio: anyres`
and carry `image_grid_pinpoints` and the tensor `model.image_newline`; they become `llava_next` folders,
as transformers' `convert_llava_next_weights_to_hf.py` writes them. What differs is the data of a
`_Release` (RELEASES, keyed by mm_patch_merge_type); the rest of the import is shared.

LLaVA-OneVision (lmms-lab llava-onevision-qwen2-*) releases say `mm_patch_merge_type: spatial_unpad` with
`image_aspect_ratio: anyres_max_N`; they are Qwen2 checkpoints (`LlavaQwenForCausalLM`) that embed their SigLIP
tower (`mm_vision_tower: google/siglip-so400m-patch14-384`) without its last layer and head, and become
`llava_onevision` folders as transformers' `convert_llava_onevision_weights_to_hf.py` writes them: the embedded
layers' last hidden state, every patch (`vision_feature_layer: -1`, `vision_feature_select_strategy: full`: the
original SigLIP tower ignores `mm_vision_select_layer`), `<image>` and `<video>` added (Qwen2's tokenizer keeps its
pad token), `LlavaOnevisionImageProcessor` with SigLIP's normalization. Video features are pooled bilinearly, the
only `mm_spatial_pool_mode` transformers implements.

Choices, following transformers' `convert_llava_weights_to_hf.py`:
- The original vocabulary has no `<image>` token: `<image>` (id V) and a `<pad>` pad token (V+1)
  are added, and the embedding and lm_head are resized to V+2 rounded up to a multiple of 64.
  transformers samples the new rows from N(mean, 1e-5 * covariance); we write the mean itself
  (each matrix's own row mean), which is deterministic and has the same expected value.
- A release without `lm_head.weight` gets a copy of `model.embed_tokens.weight`, as there.
- A `linear` projector (LLaVA-1.0) has no HF form of its own: it becomes `linear_1` = W, b and
  `linear_2` = identity with zero bias, with `projector_hidden_act: "linear"`, so transformers
  (and our model) compute exactly W x + b.
- Tensors keep their stored dtypes (typically float16 for the LLM, float32 for CLIP).
- LLaVA-NeXT: `image_grid_pinpoints` are copied as they stand (transformers reads each pair as
  (height, width), the original code as (width, height); the released lists hold both orientations),
  `use_image_newline_parameter: true` is recorded, `<pad>` is added only to a tokenizer without a pad
  token (transformers adds it for Mistral alone), and the image processor is `LlavaNextImageProcessor`
  with the pinpoints and `do_pad`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from llava_jax.config import LlavaConfig, save_config
from llava_jax.errors import LlavaJaxError
from llava_jax.fileio import read_json
from llava_jax.weights import hf, mapping

PAD_MULTIPLE = 64
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
_EMBEDDED_CLIP = "model.vision_tower.vision_tower."  # CLIP's or SigLIP's
VIDEO_TOKEN = "<video>"
# Towers a release may name without a local folder when it embeds their tensors: the tower's own config.json.
KNOWN_TOWERS = {
    "google/siglip-so400m-patch14-384": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_channels": 3, "image_size": 384, "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0},
}
_TOWER_TYPES = {"clip": "clip_vision_model", "clip_vision_model": "clip_vision_model",
                "siglip": "siglip_vision_model", "siglip_vision_model": "siglip_vision_model"}
_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "attention_bias", "mlp_bias", "head_dim",
              "sliding_window", "max_window_layers", "use_sliding_window")


@dataclasses.dataclass(frozen=True)
class _Release:
  """One original release format and the HF folder it becomes."""
  model_type: str  # the HF config's
  anyres: bool  # the original config says image_aspect_ratio "anyres" (and only then)
  tensors: dict[str, str]  # original tensors beyond the LLM, projector and tower -> HF names
  replace_pad: bool  # set `<pad>` as the pad token even where the tokenizer has one
  processor: str
  image_processor: str | None  # replaces the CLIP folder's image_processor_type
  config_extra: dict = dataclasses.field(default_factory=dict)  # top-level keys transformers' converter writes
  tokens: tuple = (IMAGE_TOKEN,)  # added to the vocabulary, in order
  adds_pad: bool = True  # a pad token is added where the tokenizer has none (or none is known)
  trimmed_tower: bool = False  # the embedded tower lacks its last layer and head: the config has the layers it holds

  def processor_config(self, config: LlavaConfig) -> dict:
    """processor_config.json: how the processor counts image tokens."""
    if self.model_type == "llava_onevision":
      return {"processor_class": self.processor, "image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN,
              "num_image_tokens": config.tokens_per_tile, "vision_aspect_ratio": config.vision_aspect_ratio,
              "vision_feature_select_strategy": config.vision_feature_select_strategy}
    return {"processor_class": self.processor, "image_token": IMAGE_TOKEN, "patch_size": config.vision.patch_size,
            "num_additional_image_tokens": 1, "vision_feature_select_strategy": config.vision_feature_select_strategy}


RELEASES = {
    "flat": _Release("llava", False, {}, True, "LlavaProcessor", None),
    "spatial_unpad": _Release("llava_next", True, {"model.image_newline": "image_newline"}, False,
                              "LlavaNextProcessor", "LlavaNextImageProcessor", {"use_image_newline_parameter": True}),
}
# spatial_unpad with image_aspect_ratio anyres_max_N: LLaVA-OneVision.
ONEVISION = _Release("llava_onevision", True, {"model.image_newline": "image_newline"}, False,
                     "LlavaOnevisionProcessor", "LlavaOnevisionImageProcessor",
                     {"use_image_newline_parameter": True, "vision_feature_layer": -1,
                      "vision_feature_select_strategy": "full"},
                     tokens=(IMAGE_TOKEN, VIDEO_TOKEN), adds_pad=False, trimmed_tower=True)


def release_of(orig: dict, cfg_path: str) -> _Release:
  merge = orig.get("mm_patch_merge_type", "flat")  # LLaVA-1.0/1.5 predate the key
  if merge == "spatial_unpad" and str(orig.get("image_aspect_ratio")).startswith("anyres_max_"):
    pool = orig.get("mm_spatial_pool_mode", "bilinear")
    if pool != "bilinear":
      raise LlavaJaxError(f"{cfg_path}: mm_spatial_pool_mode {pool!r} is not supported (bilinear, as transformers' "
                          "LLaVA-OneVision pools video frames)")
    return ONEVISION
  if merge not in RELEASES:
    raise LlavaJaxError(f"{cfg_path}: mm_patch_merge_type {merge!r} is not supported ({', '.join(RELEASES)})")
  release = RELEASES[merge]
  aspect = orig.get("image_aspect_ratio")
  if release.anyres != (aspect == "anyres") or str(aspect).startswith("anyres_"):
    want = "'anyres'" if release.anyres else "not AnyRes"
    raise LlavaJaxError(f"{cfg_path}: image_aspect_ratio {aspect!r} does not go with mm_patch_merge_type {merge!r} "
                        f"(expected {want})")
  return release


def _vision_config(tower_dir: str) -> dict:
  path = os.path.join(tower_dir, "config.json")
  d = read_json(path)
  model_type = _TOWER_TYPES.get(d.get("model_type"))
  if model_type is None:
    raise LlavaJaxError(f"{path}: model_type {d.get('model_type')!r} is not a CLIP or SigLIP model "
                        f"({', '.join(_TOWER_TYPES)})")
  if d["model_type"] in ("clip", "siglip"):
    d = d.get("vision_config") or {}
  return dict(d, model_type=model_type)


def _text_model_type(orig: dict) -> str:
  """The decoder family an original config names (model_type llava_qwen / llava_mistral, or its architectures)."""
  named = " ".join([str(orig.get("model_type", ""))] + [str(a) for a in orig.get("architectures") or []]).lower()
  return "qwen2" if "qwen" in named else "mistral" if "mistral" in named else "llama"


def _projector(orig: dict, cfg_path: str) -> str:
  kind = orig.get("mm_projector_type", "linear")  # LLaVA-1.0 predates the key and is linear
  if kind not in ("linear", "mlp2x_gelu"):
    raise LlavaJaxError(f"{cfg_path}: mm_projector_type {kind!r} is not supported (linear, mlp2x_gelu)")
  if orig.get("mm_use_im_start_end"):
    raise LlavaJaxError(f"{cfg_path}: mm_use_im_start_end is true; image start/end tokens have no Hugging Face LLaVA form")
  return kind


def build_config(orig: dict, vision: dict, cfg_path: str, token_ids: dict, pad_token: int | None, vocab: int,
                 release: _Release = RELEASES["flat"]) -> LlavaConfig:
  """The HF LLaVA config for an original release (token_ids: the id of each of release.tokens), validated by our
  own config reader."""
  text = {k: orig[k] for k in _TEXT_KEYS if k in orig}
  text.update(model_type=_text_model_type(orig), vocab_size=vocab)
  if pad_token is not None:
    text["pad_token_id"] = pad_token
  feature = orig.get("mm_vision_select_feature", "patch")
  if feature not in ("patch", "cls_patch"):
    raise LlavaJaxError(f"{cfg_path}: mm_vision_select_feature {feature!r} is not supported (patch, cls_patch)")
  kind = _projector(orig, cfg_path)
  d = {
      "model_type": release.model_type, "text_config": text, "vision_config": vision,
      "image_token_index": token_ids[IMAGE_TOKEN], "projector_hidden_act": "gelu" if kind == "mlp2x_gelu" else "linear",
      "vision_feature_layer": orig.get("mm_vision_select_layer", -1),
      "vision_feature_select_strategy": "default" if feature == "patch" else "full",
      "tie_word_embeddings": bool(orig.get("tie_word_embeddings", False)), **release.config_extra,
  }
  if pad_token is not None:
    d["pad_token_id"] = pad_token
  if release.anyres:
    d["image_grid_pinpoints"] = orig.get("image_grid_pinpoints")
  if release.model_type == "llava_onevision":
    d.update(video_token_index=token_ids[VIDEO_TOKEN], vision_aspect_ratio=orig.get("image_aspect_ratio"))
  config = LlavaConfig.from_hf_dict(d, source=cfg_path)
  mm_hidden = orig.get("mm_hidden_size")
  if mm_hidden is not None and mm_hidden != config.vision_feature_size:
    raise LlavaJaxError(f"{cfg_path}: mm_hidden_size is {mm_hidden} but the vision tower gives "
                        f"{config.vision_feature_size} features")
  return config


def _padded(vocab: int) -> int:
  return -(-(vocab + 2) // PAD_MULTIPLE) * PAD_MULTIPLE


def _resized(read, rows: int):
  def make():
    old = read()
    new = np.empty((rows, old.shape[1]), old.dtype)
    new[:old.shape[0]] = old
    new[old.shape[0]:] = old.astype(np.float32).mean(axis=0).astype(old.dtype)
    return new
  return make


def hf_name(name: str, kind: str, release: _Release) -> str | None:
  """The canonical HF name of an original release's tensor `name` (None: no tensor of the LLaVA model), for a
  projector of `kind` (mm_projector_type)."""
  if name in release.tensors:
    return release.tensors[name]
  if name.startswith(_EMBEDDED_CLIP):
    return "vision_tower." + name[len(_EMBEDDED_CLIP) + len("vision_model."):]
  if name.startswith("model.mm_projector."):
    rest = name[len("model.mm_projector."):]
    index, _, param = rest.partition(".") if kind == "mlp2x_gelu" else ("0", "", rest)
    linear = {"0": "linear_1", "2": "linear_2"}.get(index)
    return f"multi_modal_projector.{linear}.{param}" if linear else None
  if name.startswith("model."):
    return "language_model." + name
  return "language_model.lm_head.weight" if name == "lm_head.weight" else None


class _Sources:
  """Where each HF tensor of the output comes from: (reader, source name, transform)."""

  def __init__(self, llava: hf.TensorFolder, clip: hf.TensorFolder | None):
    self.llava, self.clip = llava, clip
    self.table: dict[str, tuple[hf.TensorFolder, str]] = {}

  def map_all(self, kind: str, tied: bool, release: _Release) -> None:
    for name in self.llava.names:
      if hf.IGNORABLE.search(name):
        continue
      target = hf_name(name, kind, release)
      if target is None and name.startswith("model.mm_projector."):
        raise LlavaJaxError(f"{self.llava.file_of(name)}: unexpected projector tensor {name} for mm_projector_type {kind}")
      if target is None:
        raise LlavaJaxError(f"{self.llava.file_of(name)}: unexpected tensor {name} in an original LLaVA checkpoint")
      if not (tied and target == "language_model.lm_head.weight"):
        self.table[target] = (self.llava, name)
    if self.clip is not None and not any(k.startswith("vision_tower.") for k in self.table):
      for name in self.clip.names:
        if name.startswith("vision_model.") and not hf.IGNORABLE.search(name):
          self.table["vision_tower." + name[len("vision_model."):]] = (self.clip, name)
    if not tied and "language_model.lm_head.weight" not in self.table:
      self.table["language_model.lm_head.weight"] = self.table.get("language_model.model.embed_tokens.weight")


def _expected_shapes(config: LlavaConfig) -> dict[str, tuple[int, ...]]:
  shapes = {}
  for rule in mapping.rules(config):
    _, backward = mapping.TRANSFORMS[rule.transform]
    shape = tuple(backward(np.empty(rule.shape, np.uint8)).shape)
    for name in mapping.hf_names(rule, config):
      shapes[name] = shape
  return shapes


def _add_tokens(src: str, out: str, vocab: int, release: _Release) -> tuple[dict, int | None, bool]:
  """Adds the release's tokens and (see _Release) `<pad>` to the release's tokenizer (when it has one) and saves it
  to `out`: (id of each added token, pad id, whether there was a tokenizer). Without one the tokens take the ids
  after the vocabulary, in order."""
  if not any(os.path.isfile(os.path.join(src, f)) for f in ("tokenizer.json", "tokenizer.model")):
    ids = {token: vocab + i for i, token in enumerate(release.tokens)}
    return ids, vocab + len(ids) if release.adds_pad else None, False
  import transformers
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
  except Exception as e:  # tokenizer loaders raise many types; any of them means a bad folder
    raise LlavaJaxError(f"{src}: cannot load the tokenizer: {' '.join(str(e).split())[:200]}") from None
  for token in release.tokens:
    tokenizer.add_tokens(transformers.AddedToken(token, special=True, normalized=False), special_tokens=True)
  if release.replace_pad or (release.adds_pad and tokenizer.pad_token is None):
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
  tokenizer.save_pretrained(out)
  return {token: tokenizer.convert_tokens_to_ids(token) for token in release.tokens}, tokenizer.pad_token_id, True


def _write_processor(out: str, clip_dir: str | None, src: str, orig: dict, config: LlavaConfig, tokenizer: bool,
                     release: _Release) -> None:
  """preprocessor_config.json from the release or its CLIP folder; LLaVA-1.5's pad-to-square is
  recorded as `image_aspect_ratio: "pad"` (read by llava_jax.data.images), LLaVA-NeXT's AnyRes as
  transformers' LlavaNextImageProcessor with the pinpoints."""
  for folder in (src, clip_dir):
    path = os.path.join(folder, "preprocessor_config.json") if folder else ""
    if path and os.path.isfile(path):
      pre = read_json(path)
      break
  else:
    pre = _default_preprocessor(config)
  if orig.get("image_aspect_ratio") == "pad":
    pre["image_aspect_ratio"] = "pad"
  if release.image_processor:
    pre.pop("feature_extractor_type", None)
    pre.update(image_processor_type=release.image_processor, do_pad=True,
               image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints])
  with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
    f.write(json.dumps(pre, indent=2, sort_keys=True) + "\n")
  if tokenizer:
    with open(os.path.join(out, "processor_config.json"), "w") as f:
      f.write(json.dumps(release.processor_config(config), indent=2, sort_keys=True) + "\n")


def _default_preprocessor(config: LlavaConfig) -> dict:
  """The tower's own image processor (CLIP's, or SigLIP's: a plain resize, mean and std 0.5) for a release
  without preprocessor files."""
  size = config.vision.image_size
  common = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True}
  if config.vision.model_type == "siglip_vision_model":
    return dict(common, image_processor_type="SiglipImageProcessor", size={"height": size, "width": size},
                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
  return dict(common, image_processor_type="CLIPImageProcessor", size={"shortest_edge": size}, do_center_crop=True,
              crop_size={"height": size, "width": size}, image_mean=[0.48145466, 0.4578275, 0.40821073],
              image_std=[0.26862954, 0.26130258, 0.27577711])


def _tower(orig: dict, vision_tower: str | None, cfg_path: str, embedded: bool) -> tuple[str | None, dict]:
  """(the vision tower's folder, or None for a known tower the release embeds; its vision config)."""
  if vision_tower:
    if not os.path.isdir(vision_tower):
      raise LlavaJaxError(f"--vision-tower: {vision_tower}: no such folder")
    return vision_tower, _vision_config(vision_tower)
  named = orig.get("mm_vision_tower")
  if isinstance(named, str) and os.path.isdir(named):
    return named, _vision_config(named)
  if embedded and named in KNOWN_TOWERS:
    return None, dict(KNOWN_TOWERS[named])
  raise LlavaJaxError(f"{cfg_path}: mm_vision_tower {named!r} is not a local folder; pass the vision tower's folder "
                      "with --vision-tower")


def _embedded_layers(llava: hf.TensorFolder) -> int:
  prefix = _EMBEDDED_CLIP + "vision_model.encoder.layers."
  return len({name[len(prefix):].split(".")[0] for name in llava.names if name.startswith(prefix)})


def convert(src: str, out: str, vision_tower: str | None = None, max_shard_bytes: int = 5 * 10**9) -> LlavaConfig:
  """Writes the HF LLaVA folder for the original release `src` into the existing folder `out`."""
  cfg_path = os.path.join(src, "config.json")
  orig = read_json(cfg_path)
  if not any(k in orig for k in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")):
    raise LlavaJaxError(f"{cfg_path}: not an original LLaVA config (no mm_vision_tower, mm_projector_type or mm_hidden_size)")
  kind = _projector(orig, cfg_path)
  release = release_of(orig, cfg_path)
  llava = hf.TensorFolder(src)
  embedded = any(n.startswith(_EMBEDDED_CLIP) for n in llava.names)
  clip_dir, vision = _tower(orig, vision_tower, cfg_path, embedded)
  if release.trimmed_tower and embedded:
    vision.update(num_hidden_layers=_embedded_layers(llava), vision_use_head=False)
  clip = None if embedded else hf.TensorFolder(clip_dir)

  if "model.embed_tokens.weight" not in llava:
    raise LlavaJaxError(f"{src}: missing tensor model.embed_tokens.weight")
  vocab = llava.info("model.embed_tokens.weight")[0][0]
  if "vocab_size" in orig and orig["vocab_size"] != vocab:
    raise LlavaJaxError(f"{llava.file_of('model.embed_tokens.weight')}: tensor model.embed_tokens.weight has "
                        f"{vocab} rows but {cfg_path} says vocab_size {orig['vocab_size']}")
  rows = _padded(vocab)
  placeholder = {token: vocab + i for i, token in enumerate(release.tokens)}
  # A bad config fails before the tokenizer loads.
  build_config(orig, vision, cfg_path, placeholder, vocab + len(placeholder), rows, release)
  token_ids, pad_token, has_tokenizer = _add_tokens(src, out, vocab, release)
  added = dict(token_ids, **({PAD_TOKEN: pad_token} if pad_token is not None else {}))
  if max(added.values()) >= rows:
    raise LlavaJaxError(f"{src}: the tokenizer puts {'/'.join(added)} at ids {'/'.join(map(str, added.values()))}, "
                        f"beyond the {rows}-row embedding")
  config = build_config(orig, vision, cfg_path, token_ids, pad_token, rows, release)

  sources = _Sources(llava, clip)
  sources.map_all(kind, config.text.tie_word_embeddings, release)
  specs = _specs(sources, config, rows)
  hf.write_tensors(out, specs, max_shard_bytes)
  save_config(config, out)
  hf.copy_assets(src, out, [hf.GENERATION_CONFIG])
  _write_processor(out, clip_dir, src, orig, config, has_tokenizer, release)
  return config


def _specs(sources: _Sources, config: LlavaConfig, rows: int) -> dict[str, hf.TensorSpec]:
  specs = {}
  resized = {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"}
  for name, shape in _expected_shapes(config).items():
    where = sources.table.get(name)
    if where is None and name.startswith("multi_modal_projector.linear_2.") and "multi_modal_projector.linear_1.weight" in sources.table:
      specs[name] = _identity(sources, name, shape)  # the linear projector's second layer
      continue
    if where is None:
      origin = sources.clip.folder if name.startswith("vision_tower.") and sources.clip else sources.llava.folder
      raise LlavaJaxError(f"{origin}: missing tensor for {name}")
    reader, src_name = where
    src_shape, dtype = reader.info(src_name)
    want = (src_shape[0],) + shape[1:] if name in resized else shape
    if src_shape != want or (name in resized and src_shape[0] > rows):
      raise LlavaJaxError(f"{reader.file_of(src_name)}: tensor {src_name} has shape {src_shape}, expected {want}")
    read = lambda reader=reader, src_name=src_name: reader.read(src_name)
    specs[name] = hf.TensorSpec(shape, np.dtype(hf.np_dtype(dtype)), _resized(read, rows) if name in resized else read)
  extra = set(sources.table) - set(specs)
  if extra:
    name = sorted(extra)[0]
    reader, src_name = sources.table[name]
    raise LlavaJaxError(f"{reader.file_of(src_name)}: unexpected tensor {src_name} (not part of this config's model)")
  return specs


def _identity(sources: _Sources, name: str, shape: tuple[int, ...]) -> hf.TensorSpec:
  reader, src_name = sources.table["multi_modal_projector.linear_1.weight"]
  dtype = np.dtype(hf.np_dtype(reader.info(src_name)[1]))
  if name.endswith(".weight"):
    return hf.TensorSpec(shape, dtype, lambda: np.eye(shape[0], dtype=dtype))
  return hf.TensorSpec(shape, dtype, lambda: np.zeros(shape, dtype))
