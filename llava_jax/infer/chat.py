"""`llava-jax chat`: an interactive conversation about images, with history.

Commands: `/image PATH` attaches an image to the next message, `/reset` forgets the
conversation (and its images), `/quit` or end of input leaves. Every turn re-renders the whole
conversation with the model's chat template (or its named template) and generates the answer.
"""

from __future__ import annotations

import sys
from typing import IO

from llava_jax.data import templates
from llava_jax.data.processor import add_image_tags
from llava_jax.errors import LlavaJaxError
from llava_jax.infer.generate import Prompt
from llava_jax.infer.run import Session, load_images, load_session, stream_text
from llava_jax.infer.sampling import SamplingParams

HELP = "commands: /image PATH (attach an image), /reset (new conversation), /quit"


class Conversation:
  """The turns so far and their images, rendered into one generation prompt."""

  def __init__(self, session: Session):
    self.session = session
    self.turns: list[tuple[str, str, int]] = []  # (user text, answer, images attached to the user turn)
    self.images: list = []
    self.pending: list = []  # images attached since the last question

  def reset(self) -> None:
    self.turns, self.images, self.pending = [], [], []

  def prompt(self, user_text: str) -> Prompt:
    """The model input for `user_text` as the next user turn (pending images attached to it)."""
    p = self.session.processor
    turns = self.turns + [(user_text, None, len(self.pending))]
    if p.chat_template is not None:
      text = self._render_chat_template(turns)
    else:
      history = [(add_image_tags(u, n, p.image_token), a) for u, a, n in turns[:-1]]
      special = p.tokenizer.special_tokens_map
      text = templates.generation_prompt(self.session.template, add_image_tags(user_text, len(self.pending), p.image_token),
                                         history, bos=special.get("bos_token", ""), eos=special.get("eos_token", ""))
    pictures = self.images + self.pending
    inputs = p.encode(text, pictures, self.session.image_seq_length, add_special_tokens=p.adds_special_tokens(text))
    return Prompt(inputs.input_ids, inputs.pixel_values if pictures else None)

  def _render_chat_template(self, turns) -> str:
    from transformers.utils import chat_template_utils  # slow import, only with a template
    p = self.session.processor
    messages = []
    for user, answer, n in turns:
      content = [] if p.image_token in user else [{"type": "image"}] * n
      messages.append({"role": "user", "content": content + [{"type": "text", "text": user}]})
      if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    try:
      rendered, _ = chat_template_utils.render_jinja_template(
          conversations=[messages], chat_template=p.chat_template, add_generation_prompt=True,
          **dict(p.tokenizer.special_tokens_map))
    except Exception as e:  # jinja raises many types; a broken template is the folder's problem
      raise LlavaJaxError(f"chat template failed to render ({type(e).__name__}: {e})".replace("\n", " ")) from None
    return rendered[0]

  def answered(self, user_text: str, answer: str) -> None:
    self.turns.append((user_text, answer, len(self.pending)))
    self.images += self.pending
    self.pending = []


def chat_command(model: str, image: str | None, max_new_tokens: int, temperature: float, inp: IO[str],
                 out: IO[str], mesh=None) -> None:
  session = load_session(model, mesh)
  conversation = Conversation(session)
  if image:
    conversation.pending += load_images([image])
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
    if line.startswith("/image"):
      path = line[len("/image"):].strip()
      try:
        conversation.pending += load_images([path]) if path else []
      except LlavaJaxError as e:  # a bad path should not end the conversation
        print(f"llava-jax: error: {e}", file=sys.stderr)
        continue
      print(f"(image attached: {path})" if path else "usage: /image PATH", file=sys.stderr)
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
