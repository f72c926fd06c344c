"""`llava-jax chat`: an interactive conversation about images, with history.

Commands: `/image PATH` attaches an image to the next message, `/video PATH` a video (a file or a frames
folder; video models), `/reset` forgets the conversation (and its images and videos), `/quit` or end of input
leaves. Every turn re-renders the whole
conversation (conversation.py: the model's chat template, or its named template) and generates the answer.
"""

from __future__ import annotations

import sys
from typing import IO

from llava_jax.data.conversation import Turn, user_turn
from llava_jax.errors import LlavaJaxError
from llava_jax.infer.generate import Prompt
from llava_jax.infer.run import Session, load_images, load_session, stream_text
from llava_jax.infer.sampling import SamplingParams

HELP = "commands: /image PATH (attach an image), /video PATH (attach a video), /reset (new conversation), /quit"


class Conversation:
  """The turns so far and their images and videos (sampled frames), rendered into one generation prompt."""

  def __init__(self, session: Session):
    self.session = session
    self.reset()

  def reset(self) -> None:
    self.turns: list[Turn] = []
    self.images, self.videos = [], []  # of the turns so far, in order
    self.pending, self.pending_videos = [], []  # attached since the last question

  def prompt(self, user_text: str) -> Prompt:
    """The model input for `user_text` as the next user turn (pending images and videos attached to it)."""
    inputs = self.session.processor.encode_conversation(self.turns + [self._user_turn(user_text)],
                                                        self.images + self.pending,
                                                        videos=self.videos + self.pending_videos)
    return Prompt.of(inputs)

  def answered(self, user_text: str, answer: str) -> None:
    self.turns += [self._user_turn(user_text), Turn("assistant", (answer,))]
    self.images += self.pending
    self.videos += self.pending_videos
    self.pending, self.pending_videos = [], []

  def _user_turn(self, text: str) -> Turn:
    processor = self.session.processor
    return user_turn(text, len(self.pending), processor.image_token, len(self.pending_videos), processor.video_token)


def chat_command(model: str, image: str | None, max_new_tokens: int, temperature: float, inp: IO[str],
                 out: IO[str], mesh=None, adapter: str | None = None, video: str | None = None,
                 num_frames: int | None = None, dtype: str = "auto") -> None:
  session = load_session(model, mesh, adapter, num_frames, dtype)
  conversation = Conversation(session)
  if image:
    conversation.pending += load_images([image])
  if video:
    conversation.pending_videos += session.load_videos([video])
  attach = {"/image": (load_images, "pending"), "/video": (session.load_videos, "pending_videos")}
  sampling = SamplingParams(temperature=temperature)
  print(f"llava-jax chat: {HELP}", file=sys.stderr)
  for line in inp:
    line = line.strip()
    if not line:
      continue
    if line in ("/quit", "/exit"):
      return
    if line == "/reset":
      conversation.reset()
      print("(conversation reset)", file=sys.stderr)
      continue
    command, _, path = line.partition(" ")
    if command in attach:
      load, pending = attach[command]
      path = path.strip()
      try:
        getattr(conversation, pending).extend(load([path]) if path else [])
      except LlavaJaxError as e:  # a bad path should not end the conversation
        print(f"llava-jax: error: {e}", file=sys.stderr)
        continue
      print(f"({command[1:]} attached: {path})" if path else f"usage: {command} PATH", file=sys.stderr)
      continue
    if line.startswith("/"):
      print(f"unknown command {line.split()[0]}; {HELP}", file=sys.stderr)
      continue
    try:
      prompt = conversation.prompt(line)
    except LlavaJaxError as e:  # e.g. an <image> tag without an attached image: say so, keep chatting
      print(f"llava-jax: error: {e}", file=sys.stderr)
      continue
    answer = []
    for piece in stream_text(session, prompt, max_new_tokens, sampling):
      answer.append(piece)
      out.write(piece)
      out.flush()
    out.write("\n")
    out.flush()
    conversation.answered(line, "".join(answer))
