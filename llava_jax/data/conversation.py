"""A conversation -> the prompt text the model continues; the one renderer behind generate, chat and serve.

A conversation is a list of `Turn`s: a role ("system", "user" or "assistant") and its parts in
order, text (`str`), videos (`Video`) and images (any other object: the image itself, or `IMAGE` where only its
place matters). With the model folder's chat template every turn becomes a message of
`{"type": "text"}` / `{"type": "image"}` / `{"type": "video"}` parts, rendered as transformers'
`processor.apply_chat_template(..., add_generation_prompt=True)` renders them. Without one, the
conversation template named in the checkpoint config renders it (templates.py, the same text
training sees): system turns are dropped (the template has its own), each turn's images and videos become
`<image>` and `<video>` lines before its text.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

from llava_jax.data import templates
from llava_jax.errors import LlavaJaxError


class _ImagePlace:
  """A part standing for an image that is not at hand (only its place matters to the text)."""

  def __repr__(self) -> str:
    return "IMAGE"


IMAGE = _ImagePlace()


@dataclasses.dataclass(frozen=True, eq=False)
class Video:
  """A video part: its sampled frames (F, H, W, 3) uint8, or None where only its place matters."""
  frames: Any = None


VIDEO = Video()


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str  # "system" | "user" | "assistant"
  parts: tuple  # str (text) or an image, in the order given


def is_text(part: Any) -> bool:
  return isinstance(part, str)


def is_video(part: Any) -> bool:
  return isinstance(part, Video)


def is_image(part: Any) -> bool:
  return not is_text(part) and not is_video(part)


def user_turn(text: str, num_images: int, image_token: str = templates.IMAGE_TAG, num_videos: int = 0,
              video_token: str = templates.VIDEO_TAG) -> Turn:
  """A user message as `generate` and `chat` take it: its images, then its videos, go before the text, unless
  the text places them itself with `<image>` (`<video>`) tags (then they stay where the user put them)."""
  images = () if image_token in text else (IMAGE,) * num_images
  videos = () if video_token in text else (VIDEO,) * num_videos
  return Turn("user", images + videos + (text,))


def render(turns: Sequence[Turn], chat_template: Optional[str], template: str,
           image_token: str = templates.IMAGE_TAG, special_tokens: Optional[Mapping[str, Any]] = None,
           video_token: str = templates.VIDEO_TAG) -> str:
  """The conversation as the model expects it, ending where the assistant's answer starts.

  `special_tokens` (the tokenizer's special_tokens_map) are the chat template's variables
  (bos_token, ...) and the named template's BOS/EOS.
  """
  special_tokens = dict(special_tokens or {})
  if chat_template is not None:
    return _render_chat_template(turns, chat_template, special_tokens)
  dialogue = [t for t in turns if t.role != "system"]
  roles = [t.role for t in dialogue]
  if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
    raise LlavaJaxError("this model has no chat template; its conversation template needs user and "
                        "assistant messages alternating, starting and ending with user")
  texts = [_with_media_tags(t, image_token, video_token) for t in dialogue]
  history = list(zip(texts[:-1:2], texts[1::2]))
  return templates.generation_prompt(template, texts[-1], history, bos=special_tokens.get("bos_token") or "",
                                     eos=special_tokens.get("eos_token") or "")


def _render_chat_template(turns: Sequence[Turn], chat_template: str, template_vars: dict) -> str:
  from transformers.utils import chat_template_utils  # pylint: disable=import-outside-toplevel  (slow import)
  messages = [{"role": t.role, "content": [_message_part(p) for p in t.parts]} for t in turns]
  try:
    rendered, _ = chat_template_utils.render_jinja_template(
        conversations=[messages], chat_template=chat_template, add_generation_prompt=True, **template_vars)
  except Exception as e:  # jinja raises many types; templates raise on e.g. roles they do not support
    raise LlavaJaxError(f"chat template failed to render ({type(e).__name__}: {e})".replace("\n", " ")) from None
  return rendered[0]


def _message_part(part: Any) -> dict:
  if is_text(part):
    return {"type": "text", "text": part}
  return {"type": "video" if is_video(part) else "image"}


def _with_media_tags(turn: Turn, image_token: str, video_token: str) -> str:
  """The turn's text with one `<image>` line per image, then one `<video>` line per video, before it, unless the
  text places its tags."""
  text = "\n".join(p for p in turn.parts if is_text(p))
  lines = [(image_token, sum(map(is_image, turn.parts))), (video_token, sum(map(is_video, turn.parts)))]
  return "".join(f"{tag}\n" * count for tag, count in lines if count and tag not in text) + text
