"""Image decoding, pad-to-square and CLIP preprocessing (NHWC float32), matching transformers.

`load_image` turns a file (or bytes) into an RGB PIL image, refusing what is not an image or is
too large. `ImageProcessor` reproduces the image processor transformers' `AutoImageProcessor`
builds from the same `preprocessor_config.json`: with transformers 5.x that is `CLIPImageProcessorPil`
(PIL backend) when torchvision is not installed; with torchvision it is the torchvision-backed
`CLIPImageProcessor`, whose bicubic resize can differ from PIL's by one uint8 level on some pixels.
"""

import dataclasses
import io
import json
import os
import struct
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_jax.errors import LlavaJaxError
from llava_jax.fileio import read_json

# OpenAI CLIP's normalization constants (what the CLIP towers of LLaVA were trained with).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)  # SigLIP's
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# Refuse larger images before decoding their pixels (a decompression bomb guard).
DEFAULT_MAX_PIXELS = 8192 * 8192

# transformers' convert_to_rgb composites transparency onto white; do the same for parity.
WHITE = (255, 255, 255)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

ImageSource = Union[str, os.PathLike, bytes, bytearray]


def _source_name(source: ImageSource) -> str:
  if isinstance(source, (bytes, bytearray)):
    return f"<{len(source)} bytes of image data>"
  return os.fspath(source)


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS,
               background_rgb: Tuple[int, int, int] = WHITE) -> Image.Image:
  """Decodes a file path or bytes into an upright RGB image.

  Raises LlavaJaxError (one line naming the file) for a missing file, a non-image, a truncated
  image, or one with more than `max_pixels` pixels (checked from the header, before decoding).
  """
  name = _source_name(source)
  data = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
  try:
    # PIL itself warns past Image.MAX_IMAGE_PIXELS and refuses past twice that, in Image.open;
    # silencing that with warnings.catch_warnings is not thread-safe (loaders use threads).
    with Image.open(data) as img:
      width, height = img.size
      if width * height > max_pixels:
        raise LlavaJaxError(
            f"{name}: image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} pixels")
      img.load()
      img = _exif_upright(img)
      return to_rgb(img, background_rgb, name=name)
  except LlavaJaxError:
    raise
  except FileNotFoundError:
    raise LlavaJaxError(f"{name}: image file not found") from None
  except PermissionError:
    raise LlavaJaxError(f"{name}: permission denied reading the image") from None
  except IsADirectoryError:
    raise LlavaJaxError(f"{name}: is a directory, expected an image file") from None
  except UnidentifiedImageError:
    raise LlavaJaxError(f"{name}: not an image (PIL cannot identify the format)") from None
  except Image.DecompressionBombError as e:
    raise LlavaJaxError(f"{name}: image too large ({e})".replace("\n", " ")) from None
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    # Truncated or corrupt pixel data surfaces here, from img.load().
    message = str(e).replace("\n", " ")
    raise LlavaJaxError(f"{name}: cannot decode image ({type(e).__name__}: {message})") from None


def _exif_upright(img: Image.Image) -> Image.Image:
  """Applies the EXIF orientation tag; a malformed EXIF block leaves the image as stored."""
  try:
    return ImageOps.exif_transpose(img)
  except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
    return img


def _high_depth_to_l(img: Image.Image) -> Image.Image:
  """Scales a 16-bit, 32-bit int or float single-channel image to 8 bits (PIL would clip)."""
  values = np.asarray(img).astype(np.float64)
  if img.mode.startswith("I;16"):
    scale = 255.0 / 65535.0
  elif img.mode == "F" and values.size and np.nanmax(values) <= 1.0:
    scale = 255.0  # float images in [0, 1]
  else:
    # 'I' and other 'F' images: 8-bit range as is, 16-bit range scaled, anything larger by its max.
    peak = float(np.nanmax(values)) if values.size else 0.0
    scale = 1.0 if peak <= 255 else 255.0 / 65535.0 if peak <= 65535 else 255.0 / peak
  scaled = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
  return Image.fromarray(scaled, mode="L")


def to_rgb(img: Image.Image, background_rgb: Tuple[int, int, int] = WHITE,
           name: str = "image") -> Image.Image:
  """Any PIL mode to RGB: transparency composited on `background_rgb`, high bit depths scaled."""
  if img.mode == "RGB":
    return img.copy()
  if img.mode in _HIGH_DEPTH_MODES:
    img = _high_depth_to_l(img)
  elif img.mode == "La":
    img = img.convert("LA")  # PIL converts premultiplied La to LA only
  bands = img.getbands()
  if "A" in bands or "a" in bands or img.info.get("transparency") is not None:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, tuple(background_rgb) + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
  try:
    return img.convert("RGB")
  except ValueError as e:
    raise LlavaJaxError(f"{name}: cannot convert image mode {img.mode} to RGB ({e})") from None


def pad_to_square(img: Image.Image, background_rgb: Sequence[int]) -> Image.Image:
  """LLaVA-1.5's expand2square: centers the image on a square of the longer side."""
  width, height = img.size
  if width == height:
    return img
  side = max(width, height)
  square = Image.new(img.mode, (side, side), tuple(int(c) for c in background_rgb))
  square.paste(img, ((side - width) // 2, (side - height) // 2))
  return square


def _size_dict(value: Any, default_to_square: bool, key: str) -> dict:
  """Normalizes transformers' size forms (int, [h, w], dict) to one dict form."""
  if isinstance(value, int):
    if default_to_square:
      return {"height": value, "width": value}
    return {"shortest_edge": value}
  if isinstance(value, (list, tuple)) and len(value) == 2:
    return {"height": int(value[0]), "width": int(value[1])}
  if isinstance(value, dict):
    if set(value) == {"shortest_edge"} or set(value) == {"height", "width"}:
      return {k: int(v) for k, v in value.items()}
  raise LlavaJaxError(
      f"image processor {key}: expected an int, [height, width], {{'shortest_edge'}} or "
      f"{{'height', 'width'}}, got {value!r}")


# image_processor_type -> the values transformers' class (its PIL backend) takes for the keys a
# preprocessor_config.json leaves out; CLIP's are the dataclass defaults. SigLIP and OneVision resize
# straight to a square and crop nothing.
_SQUARE_NO_CROP = dict(size={"height": 384, "width": 384}, crop_size=None, do_center_crop=False)
PROCESSOR_DEFAULTS = {
    "CLIPImageProcessor": {},
    "LlavaImageProcessor": {},
    "LlavaNextImageProcessor": {},
    "SiglipImageProcessor": dict(_SQUARE_NO_CROP, size={"height": 224, "width": 224},
                                 image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD),
    "LlavaOnevisionImageProcessor": _SQUARE_NO_CROP,
}


def processor_kind(config: dict) -> str:
  """A config's image_processor_type without the backend suffix transformers may write ("...Fast", "...Pil")."""
  kind = str(config.get("image_processor_type", "CLIPImageProcessor"))
  for suffix in ("Fast", "Pil"):
    if kind.endswith(suffix):
      kind = kind[:-len(suffix)]
  return kind


@dataclasses.dataclass
class ImageProcessor:
  """CLIP-style preprocessing (SigLIP's and OneVision's: no crop); `preprocess` returns float32 (H, W, 3)."""
  size: dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 224})
  crop_size: Optional[dict] = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
  resample: int = Image.Resampling.BICUBIC
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: Tuple[float, float, float] = OPENAI_CLIP_MEAN
  image_std: Tuple[float, float, float] = OPENAI_CLIP_STD
  do_convert_rgb: bool = True
  # LLaVA-1.5's image_aspect_ratio == "pad" (transformers: LlavaImageProcessor with do_pad).
  pad_to_square: bool = False
  kind: str = "CLIPImageProcessor"  # image_processor_type (without backend suffix) it was read from

  @classmethod
  def default(cls, image_size: int, pad_to_square: bool = False) -> "ImageProcessor":
    """CLIP's standard preprocessing for a square vision tower input of `image_size`."""
    return cls(size={"shortest_edge": image_size},
               crop_size={"height": image_size, "width": image_size},
               pad_to_square=pad_to_square)

  @classmethod
  def from_config(cls, config: dict, image_aspect_ratio: Optional[str] = None) -> "ImageProcessor":
    """From a preprocessor_config.json dict; `image_aspect_ratio="pad"` forces pad-to-square."""
    kind = processor_kind(config)
    pad = (kind == "LlavaImageProcessor" and bool(config.get("do_pad", False))) or (
        config.get("image_aspect_ratio") == "pad")
    if image_aspect_ratio is not None:
      pad = image_aspect_ratio == "pad"
    defaults = dataclasses.replace(cls(), **PROCESSOR_DEFAULTS.get(kind, {}))
    value = lambda key: getattr(defaults, key) if config.get(key) is None else config[key]
    flag = lambda key: bool(config.get(key, getattr(defaults, key)))  # transformers' None: off
    # A bare int `size` is the shortest edge (CLIP, and SigLIP's default_to_square=False), a bare int crop square.
    crop = value("crop_size")
    return cls(
        size=_size_dict(value("size"), False, "size"),
        crop_size=None if crop is None else _size_dict(crop, True, "crop_size"),
        resample=int(value("resample")),
        do_resize=flag("do_resize"),
        do_center_crop=flag("do_center_crop"),
        do_rescale=flag("do_rescale"),
        rescale_factor=float(value("rescale_factor")),
        do_normalize=flag("do_normalize"),
        image_mean=_triple(value("image_mean"), "image_mean"),
        image_std=_triple(value("image_std"), "image_std"),
        do_convert_rgb=flag("do_convert_rgb"),
        # the CLIP-style kinds differ only in pad_to_square, which to_config writes back as their type
        pad_to_square=pad, kind=kind if PROCESSOR_DEFAULTS.get(kind) else defaults.kind)

  @classmethod
  def from_folder(cls, folder: Union[str, os.PathLike], image_size: Optional[int] = None,
                  image_aspect_ratio: Optional[str] = None) -> "ImageProcessor":
    """From a model folder's image processor config (see read_image_processor_config), else
    `default(image_size)` when given."""
    config = read_image_processor_config(folder)
    if config is not None:
      return cls.from_config(config, image_aspect_ratio)
    if image_size is None:
      raise LlavaJaxError(
          f"{os.fspath(folder)}: no {PREPROCESSOR_CONFIG} or image_processor section in "
          f"{PROCESSOR_CONFIG}, and no image size to build a default CLIP preprocessor")
    return cls.default(image_size, pad_to_square=image_aspect_ratio == "pad")

  @property
  def background_rgb(self) -> Tuple[int, int, int]:
    """LLaVA's pad color: the mean as 0..255 ints (truncated, as LLaVA and transformers do)."""
    return tuple(int(m * 255) for m in self.image_mean)

  @property
  def output_size(self) -> Tuple[int, int]:
    """(height, width) of what `preprocess` returns, for fixed-size (center-cropped or square-resized) configs."""
    if self.do_center_crop:
      return self.crop_size["height"], self.crop_size["width"]
    if "height" in self.size:
      return self.size["height"], self.size["width"]
    raise LlavaJaxError(
        f"image processor size {self.size} without center crop gives images of varying size")

  def to_config(self) -> dict:
    """A preprocessor_config.json dict that transformers' AutoImageProcessor loads back."""
    kind = "LlavaImageProcessor" if self.pad_to_square and self.kind == "CLIPImageProcessor" else self.kind
    config = {
        "image_processor_type": kind,
        "do_resize": self.do_resize, "size": dict(self.size), "resample": int(self.resample),
        "do_center_crop": self.do_center_crop, "crop_size": self.crop_size and dict(self.crop_size),
        "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
        "do_normalize": self.do_normalize, "image_mean": list(self.image_mean),
        "image_std": list(self.image_std), "do_convert_rgb": self.do_convert_rgb,
    }
    if self.pad_to_square and kind == "LlavaImageProcessor":
      config["do_pad"] = True
    return config

  def save(self, folder: Union[str, os.PathLike]) -> str:
    """Writes folder/preprocessor_config.json and returns its path."""
    path = os.path.join(folder, PREPROCESSOR_CONFIG)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(self.to_config(), f, indent=2, sort_keys=True)
      f.write("\n")
    return path

  def as_rgb(self, img: Image.Image) -> Image.Image:
    """`img` itself when RGB, else converted (refused when do_convert_rgb is false)."""
    if img.mode == "RGB":
      return img
    if not self.do_convert_rgb:
      raise LlavaJaxError(f"image mode {img.mode} is not RGB and do_convert_rgb is false")
    return to_rgb(img)

  def preprocess(self, img: Image.Image) -> np.ndarray:
    """One PIL image -> float32 (H, W, 3), step for step as transformers' PIL backend."""
    img = self.as_rgb(img)
    if self.pad_to_square:
      img = pad_to_square(img, self.background_rgb)
    if self.do_resize:
      height, width = self._resized_hw(img.height, img.width)
      img = img.resize((width, height), resample=self.resample)
    pixels = np.asarray(img)
    if self.do_center_crop:
      pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
    # Same arithmetic as transformers: rescale in float64 then cast, normalize in float32.
    out = pixels.astype(np.float32)
    if self.do_rescale:
      out = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
    if self.do_normalize:
      out = (out - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
    return out

  def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
    """A list of images -> float32 (N, H, W, 3); N may be 0 (shape then from the config)."""
    if not images:
      return np.zeros((0,) + self.output_size + (3,), np.float32)
    return np.stack([self.preprocess(img) for img in images])

  def _resized_hw(self, height: int, width: int) -> Tuple[int, int]:
    if "height" in self.size:
      return self.size["height"], self.size["width"]
    # Shortest edge to `size`, the other edge truncated to int (transformers' rule).
    target = self.size["shortest_edge"]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(target * long / short)
    return (new_long, target) if width <= height else (target, new_long)


def _triple(value: Any, key: str) -> Tuple[float, float, float]:
  values = [value] * 3 if isinstance(value, (int, float)) else list(value)
  if len(values) != 3:
    raise LlavaJaxError(f"image processor {key}: expected 3 values (RGB), got {value!r}")
  return tuple(float(v) for v in values)


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
  """Center crop of (H, W, C); zero padding where the image is smaller (transformers' rule)."""
  height, width = pixels.shape[:2]
  top, left = (height - crop_h) // 2, (width - crop_w) // 2
  if top >= 0 and left >= 0:
    return pixels[top:top + crop_h, left:left + crop_w]
  # Pad to at least the crop size, centered with the extra pixel before (ceil), then crop.
  new_h, new_w = max(crop_h, height), max(crop_w, width)
  pad_top, pad_left = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
  canvas = np.zeros((new_h, new_w) + pixels.shape[2:], pixels.dtype)
  canvas[pad_top:pad_top + height, pad_left:pad_left + width] = pixels
  top, left = top + pad_top, left + pad_left
  return canvas[max(0, top):top + crop_h, max(0, left):left + crop_w]


def read_image_processor_config(folder: Union[str, os.PathLike]) -> Optional[dict]:
  """The image processor dict of a model folder, or None when it has none.

  Same priority as transformers 5: the `image_processor` section that LlavaProcessor.save_pretrained
  nests in processor_config.json, then the older standalone preprocessor_config.json.
  """
  for filename, section in ((PROCESSOR_CONFIG, "image_processor"), (PREPROCESSOR_CONFIG, None)):
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
      continue
    config = read_json(path)
    if section is not None:
      config = config.get(section)
    if isinstance(config, dict):
      return config
  return None
