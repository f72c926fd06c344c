"""Inference-side processor: (prompt text, images, videos) -> model inputs, as transformers' LlavaProcessor,
LlavaNextProcessor, LlavaOnevisionProcessor and LlavaNextVideoProcessor.

`Processor.prepare` is what `llava-jax generate` calls: render the user's message (conversation.py:
chat template of the folder, else a named fallback template), expand each `<image>` to the number of
image tokens its image gives under the model's image layout (data/layouts.py), each `<video>` to its video tokens
(data/video.py; videos given as decoded frames), tokenize with the
folder's tokenizer and preprocess the images into tower inputs (NHWC) with the feature index.
"""

import dataclasses
import os
import re
from typing import List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from llava_jax.data import conversation
from llava_jax.data import images as images_lib
from llava_jax.data import templates
from llava_jax.data.layouts import ImageLayout, image_labels, join_feature_indexes, prompt_layout
from llava_jax.data.video import Frames, VideoLayout
from llava_jax.errors import LlavaJaxError
from llava_jax.image_tokens import FeatureMix, check_image_tokens
from llava_jax.fileio import read_json

CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"

ImageLike = Union[Image.Image, images_lib.ImageSource]
PathLike = Union[str, os.PathLike]
VIDEO_TAG = templates.VIDEO_TAG


# tokenizer_config.json classes that are plain `tokenizer.json` wrappers: loaded directly, they
# skip AutoTokenizer's import of the model-config machinery, which imports torch (~5 s).
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(folder: PathLike):
  """The folder's tokenizer as transformers.AutoTokenizer loads it, local files only."""
  import transformers  # pylint: disable=import-outside-toplevel  (slow import, only when needed)
  folder = os.fspath(folder)
  config = os.path.join(folder, "tokenizer_config.json")
  name = read_json(config).get("tokenizer_class") if os.path.isfile(config) else None
  loader = getattr(transformers, name) if name in PLAIN_TOKENIZER_CLASSES else transformers.AutoTokenizer
  try:
    return loader.from_pretrained(folder, local_files_only=True)
  except (OSError, ValueError, KeyError, TypeError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise LlavaJaxError(f"{folder}: cannot load tokenizer ({message})") from None


def load_chat_template(folder: PathLike, tokenizer=None) -> Optional[str]:
  """The chat template LlavaProcessor.from_pretrained would use, else the tokenizer's, else None.

  transformers' processor order: processor_config.json's `chat_template` key, then the legacy
  chat_template.json, then chat_template.jinja.
  """
  processor_config = os.path.join(folder, images_lib.PROCESSOR_CONFIG)
  if os.path.isfile(processor_config):
    template = read_json(processor_config).get("chat_template")
    if template is not None:
      return _default_template(template, processor_config)
  legacy = os.path.join(folder, CHAT_TEMPLATE_JSON)
  if os.path.isfile(legacy):
    template = read_json(legacy).get("chat_template")
    if template is None:
      raise LlavaJaxError(f"{legacy}: no 'chat_template' key")
    return _default_template(template, legacy)
  jinja = os.path.join(folder, CHAT_TEMPLATE_JINJA)
  if os.path.isfile(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  template = getattr(tokenizer, "chat_template", None)
  return _default_template(template, "tokenizer chat_template") if template else None


def _default_template(template, where: str) -> str:
  """A template string; from a name -> template mapping (or list) take the one named 'default'."""
  if isinstance(template, list):
    template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
  if isinstance(template, dict):
    if "default" not in template:
      raise LlavaJaxError(f"{where}: several chat templates ({', '.join(map(str, template))}) "
                          "and none named 'default'")
    template = template["default"]
  if not isinstance(template, str):
    raise LlavaJaxError(f"{where}: chat template is {type(template).__name__}, expected a string")
  return template


@dataclasses.dataclass
class LlavaInputs:
  """Model inputs. input_ids int32 (S,) or (B, S); pixel_values float32 (N, H, W, 3), the tower inputs
  (images, AnyRes tiles, video frames) of all rows in order; image_feature_index int32 (image tokens,): the
  feature each image token takes (see layouts.images_feature_index; a FeatureMix for OneVision's lone images),
  one per row when batched;
  attention_mask int32 like input_ids (batched only)."""
  input_ids: np.ndarray
  pixel_values: np.ndarray
  image_feature_index: Union[np.ndarray, FeatureMix, List[Union[np.ndarray, FeatureMix]]]
  attention_mask: Optional[np.ndarray] = None


class Processor:
  """Tokenizer + image processor + image layout + chat template of one model folder."""

  def __init__(self, tokenizer, image_processor: images_lib.ImageProcessor, layout: ImageLayout,
               chat_template: Optional[str] = None, image_token: Optional[str] = None,
               fallback_template: str = "vicuna_v1", video_layout: Optional[VideoLayout] = None,
               video_token: Optional[str] = None):
    self.tokenizer = tokenizer
    self.image_processor = image_processor
    self.layout = layout
    self.video_layout = video_layout  # None: the model takes no videos
    self.chat_template = chat_template
    # LlavaProcessor's rule: the tokenizer's own image_token wins over the configured one (video_token alike).
    self.image_token = getattr(tokenizer, "image_token", None) or image_token or templates.IMAGE_TAG
    self.video_token = getattr(tokenizer, "video_token", None) or video_token or VIDEO_TAG
    self.fallback_template = fallback_template

  @classmethod
  def from_folder(cls, folder: PathLike, layout: ImageLayout, image_size: Optional[int] = None,
                  fallback_template: str = "vicuna_v1", image_aspect_ratio: Optional[str] = None,
                  video_layout: Optional[VideoLayout] = None) -> "Processor":
    """Loads a model folder's tokenizer, image processor (default CLIP one of `image_size` when
    the folder has none) and chat template; its processor files must agree with the model's `layout`.
    `video_layout`: a video model's (data/video.video_layout_for)."""
    if not os.path.isdir(folder):
      raise LlavaJaxError(f"{os.fspath(folder)}: model folder not found")
    tokenizer = load_tokenizer(folder)
    image_processor = images_lib.ImageProcessor.from_folder(folder, image_size, image_aspect_ratio)
    processor_config = os.path.join(folder, images_lib.PROCESSOR_CONFIG)
    settings = read_json(processor_config) if os.path.isfile(processor_config) else {}
    layout.check_processor_files(folder)
    return cls(tokenizer, image_processor, layout, load_chat_template(folder, tokenizer), settings.get("image_token"),
               fallback_template, video_layout, settings.get("video_token"))

  @property
  def image_token_id(self) -> int:
    return self._token_id(self.image_token, "image")

  def _token_id(self, token: str, kind: str) -> int:
    ids = self.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
      raise LlavaJaxError(f"tokenizer encodes {kind} token {token!r} as {len(ids)} "
                          "tokens, expected one (add it as a special token)")
    return ids[0]

  @property
  def pad_token_id(self) -> int:
    pad = self.tokenizer.pad_token_id
    return 0 if pad is None else int(pad)

  def render(self, turns: Sequence[conversation.Turn]) -> str:
    """The conversation as this model's prompt text (see conversation.render)."""
    return conversation.render(turns, self.chat_template, self.fallback_template, self.image_token,
                               self.tokenizer.special_tokens_map, self.video_token)

  def format_prompt(self, user_text: str, num_images: int) -> str:
    """The prompt for one user message with `num_images` images."""
    return self.render([conversation.user_turn(user_text, num_images, self.image_token)])

  def prepare(self, text: str, images: Sequence[ImageLike], raw: bool = False,
              names: Optional[Sequence[str]] = None, videos: Sequence[Frames] = ()) -> LlavaInputs:
    """What `generate` feeds the model: --raw text verbatim, else the rendered user message. `names`: how
    errors name the images (their files), where they are given decoded; `videos`: decoded, sampled frames."""
    if raw:
      return self.encode(text, images, names=names, videos=videos)
    turn = conversation.user_turn(text, len(images), self.image_token, len(videos), self.video_token)
    return self.encode_conversation([turn], images, names, videos)

  def encode_conversation(self, turns: Sequence[conversation.Turn], images: Sequence[ImageLike],
                          names: Optional[Sequence[str]] = None, videos: Sequence[Frames] = ()) -> LlavaInputs:
    """A conversation's prompt (ending where the answer starts) with its images and videos, in their order."""
    prompt = self.render(turns)
    return self.encode(prompt, images, add_special_tokens=self.adds_special_tokens(prompt), names=names,
                       videos=videos)

  def adds_special_tokens(self, formatted_prompt: str) -> bool:
    """processor.apply_chat_template(tokenize=True)'s rule: no second BOS when the rendered
    template already starts with it."""
    bos = self.tokenizer.bos_token
    return not (bos is not None and formatted_prompt.startswith(bos))

  def encode(self, prompt_text: str, images: Sequence[ImageLike], image_token: Optional[str] = None,
             add_special_tokens: bool = True, names: Optional[Sequence[str]] = None,
             videos: Sequence[Frames] = ()) -> LlavaInputs:
    """Expands the i-th `<image>` to the tokens of the i-th image, the i-th `<video>` to those of the i-th video
    (its decoded frames), and tokenizes (LlavaProcessor's way); tower inputs and feature index in prompt order."""
    image_token = image_token or self.image_token
    if videos and self.video_layout is None:
      raise LlavaJaxError("this model takes no videos")
    tags = [image_token] + ([self.video_token] if self.video_layout is not None else [])
    found = re.findall("|".join(map(re.escape, tags)), prompt_text)
    for tag, given, kind in zip(tags, (images, videos), ("image", "video")):
      if found.count(tag) != len(given):
        raise LlavaJaxError(f"prompt has {found.count(tag)} {tag} tag(s) but {len(given)} "
                            f"{kind}(s) were given; they must match")
    names = list(names) if names is not None else image_labels(images)
    layout = prompt_layout(self.layout, len(images))
    media = {image_token: iter([self._image_part(layout, _as_pil(img), name) for img, name in zip(images, names)]),
             self.video_token: iter([self._video_part(frames, f"video {i + 1}") for i, frames in enumerate(videos)])}
    parts = [(tag,) + next(media[tag]) for tag in found]  # (tag, tokens, pixels, index, tiles) in prompt order
    pieces = re.split("|".join(map(re.escape, tags)), prompt_text)
    expanded = pieces[0] + "".join(tag * n + piece for (tag, n, *_), piece in zip(parts, pieces[1:]))
    ids = self.tokenizer(expanded, add_special_tokens=add_special_tokens)["input_ids"]
    for tag, kind in zip(tags, ("image", "video")):
      count = sum(n for t, n, *_ in parts if t == tag)
      if count:  # (a prompt without images needs no image token in the tokenizer)
        check_image_tokens(ids, self._token_id(tag, kind), count, "tokenized prompt", f"{kind}s")
    pixel_values = (np.concatenate([pixels for _, _, pixels, _, _ in parts]) if parts
                    else self.image_processor([]))
    index = join_feature_indexes([p[3] for p in parts], [p[4] for p in parts], layout.tokens_per_tile)
    return LlavaInputs(np.asarray(ids, np.int32), pixel_values, index)

  def _image_part(self, layout: ImageLayout, picture: Image.Image, name: str) -> tuple:
    size = (picture.height, picture.width)
    return (layout.num_image_tokens(size, name), layout.pixels(picture, self.image_processor, name),
            layout.feature_index(size, name), layout.tiles(size, name))

  def _video_part(self, frames: Frames, name: str) -> tuple:
    pixels = self.video_layout.pixels(frames, self.image_processor, name)
    count = len(pixels)
    return (self.video_layout.num_video_tokens(count), pixels, self.video_layout.feature_index(count),
            self.video_layout.tiles(count))

  def encode_batch(self, prompts: Sequence[str], images: Sequence[Sequence[ImageLike]],
                   add_special_tokens: bool = True, length: Optional[int] = None) -> LlavaInputs:
    """Several prompts, LEFT padded (with the tokenizer's pad id, else 0) to the longest or to
    `length`; `images[i]` are the images of prompt i."""
    if len(prompts) != len(images):
      raise LlavaJaxError(f"{len(prompts)} prompts but {len(images)} image lists; they must match")
    rows = [self.encode(p, imgs, add_special_tokens=add_special_tokens) for p, imgs in zip(prompts, images)]
    longest = max((len(r.input_ids) for r in rows), default=0)
    width = longest if length is None else length
    if width < longest:
      raise LlavaJaxError(f"prompt of {longest} tokens does not fit the length {length}")
    input_ids = np.full((len(rows), width), self.pad_token_id, np.int32)
    attention_mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
      n = len(row.input_ids)
      input_ids[i, width - n:] = row.input_ids
      attention_mask[i, width - n:] = 1
    pixel_values = np.concatenate([r.pixel_values for r in rows]) if rows else self.image_processor([])
    return LlavaInputs(input_ids, pixel_values, [r.image_feature_index for r in rows], attention_mask)

  def decode(self, token_ids: Union[np.ndarray, List[int]]) -> str:
    """Generated ids -> text without special tokens (as LlavaProcessor.decode is used)."""
    return self.tokenizer.decode(np.asarray(token_ids).tolist(), skip_special_tokens=True)


def _as_pil(image: ImageLike) -> Image.Image:
  return image if isinstance(image, Image.Image) else images_lib.load_image(image)
