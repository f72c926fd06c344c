"""Conversation templates and the training label mask (loss on the assistant's answers only).

A template turns a conversation into text pieces, each flagged "target" or not. The whole text is
tokenized ONCE (the fast tokenizer's offsets map tokens back to characters) and a token is a
target when its characters overlap a target piece. Tokenizing once, instead of per round as
LLaVA's `preprocess_v1` does, guarantees that training sees exactly the tokens inference sees,
and needs no per-tokenizer "-2" corrections.

Targets are the assistant's answer and its end-of-turn marker (EOS, `<|im_end|>` or `<|eot_id|>`);
system text, user turns, role headers, BOS and image tokens are never targets. The texts follow
LLaVA's `conversation.py` (`conv_llava_plain`, `conv_vicuna_v1`, `conv_llava_llama_2`,
`conv_mistral_instruct`, `conv_chatml_direct`) and LLaVA-NeXT's (`conv_qwen`, `conv_llava_llama_3`).
Deliberate differences: `plain` ends the caption with EOS instead of LLaVA's "\\n" (so a stage-1
model stops generating); LLaVA-NeXT's `preprocess_qwen` / `preprocess_llama3` also put loss on
the format's fixed tokens in EVERY turn (`<|im_start|>`, `<|im_end|>`, "\\n"; `<|begin_of_text|>`,
`<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`, "\\n\\n"), including those of user
turns and the assistant's role header; here, as for every other template, only the answer and the
end-of-turn marker that stops generation carry loss.

NeXT templates and the references they reproduce:
- `llama_3` (llama3-llava-next-8b): Meta-Llama-3-Instruct's chat template (the jinja in its
  tokenizer_config.json) applied to [system, user, assistant, ...] with LLaVA's system prompt:
  `<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>` then
  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{text, trimmed}<|eot_id|>` per turn. That is
  how LLaVA-NeXT trained the model: `preprocess_llama3` applies that template turn by turn after
  `conv_llava_llama_3`'s system prompt. Not reproduced: llava-hf's processor template for
  llama3-llava-next-8b-hf (no system prompt, and "\\n" before every message's text, so
  "<|end_header_id|>\\n\\n\\n" before each answer) and the doubled `<|start_header_id|>` of
  `conv_llava_llama_3.get_prompt` (its roles carry the header too), neither of which training saw.
  A folder with a chat template is still rendered with it, as transformers does (conversation.py).
  The text starts with BOS, as the Llama-3 template writes it, so tokenizing adds no second one
  (`Rendered.has_bos`: the rule of the processor's `adds_special_tokens`).
- `chatml` (Qwen NeXT: llava-next-72b/110b): Qwen2's chat template (default system
  "You are a helpful assistant.", "\\n" after every `<|im_end|>`), which is also LLaVA-NeXT's
  `conv_qwen` / `preprocess_qwen` text and llava-hf's documented llava-next-72b-hf prompt.
- `chatml_direct` (llava-v1.6-34b, Yi-34B): LLaVA's `conv_chatml_direct`, the format that model
  was trained with: system "Answer the questions." and NO "\\n" after `<|im_end|>`, as llava-hf
  documents the llava-v1.6-34b-hf prompt and as transformers' conversion script checked against
  the original input ids. It differs from `chatml` in those two places only, so one `chatml`
  cannot serve both Yi and Qwen models exactly.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np

from llava_jax.errors import LlavaJaxError

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"  # transformers' video processors' default video_token
HUMAN, GPT = "human", "gpt"

VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the "
                  "visual content that the user provides, and assist the user with a variety of "
                  "tasks using natural language.")
CHATML_SYSTEM = "You are a helpful assistant."
CHATML_DIRECT_SYSTEM = "Answer the questions."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
EOT = "<|eot_id|>"

# (text, is_target) pieces; a conversation is a list of (user, answer-or-None) exchanges, where
# None means "open": the text ends where the assistant's answer would start (generation).
Pieces = List[Tuple[str, bool]]
Exchanges = Sequence[Tuple[str, Optional[str]]]


@dataclasses.dataclass(frozen=True)
class Rendered:
  """A rendered conversation: its text and the [start, end) character spans that carry loss."""
  text: str
  spans: Tuple[Tuple[int, int], ...]
  has_bos: bool = False  # the text starts with BOS itself: tokenizing must not add a second one


def _plain(exchanges: Exchanges, bos: str, eos: str) -> Pieces:
  # Stage 1 (feature alignment): the user's words are dropped, only their image tags stay.
  pieces: Pieces = []
  for user, answer in exchanges:
    pieces.append((IMAGE_TAG * user.count(IMAGE_TAG), False))
    if answer is not None:
      pieces.append((answer + eos, True))
  return pieces


def _vicuna_v1(exchanges: Exchanges, bos: str, eos: str) -> Pieces:
  pieces: Pieces = [(VICUNA_SYSTEM + " ", False)]
  for user, answer in exchanges:
    if answer is None:
      pieces.append((f"USER: {user} ASSISTANT:", False))
    else:
      pieces += [(f"USER: {user} ASSISTANT: ", False), (answer + eos, True)]
  return pieces


def _inst(exchanges: Exchanges, bos: str, eos: str, system: str, round_sep: str) -> Pieces:
  # LLaVA's LLAMA_2 separator style: "[INST] q [/INST] a </s>", later rounds after `round_sep`.
  pieces: Pieces = []
  for i, (user, answer) in enumerate(exchanges):
    if i == 0 and system:
      user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
    pieces.append(((round_sep if i else "") + f"[INST] {user} [/INST]", False))
    if answer is not None:
      pieces += [(" ", False), (f"{answer} {eos}", True)]
  return pieces


def _llama_2(exchanges: Exchanges, bos: str, eos: str) -> Pieces:
  return _inst(exchanges, bos, eos, LLAMA_2_SYSTEM, round_sep=bos)


def _mistral_instruct(exchanges: Exchanges, bos: str, eos: str) -> Pieces:
  return _inst(exchanges, bos, eos, "", round_sep="")


def _chatml_turns(exchanges: Exchanges, system: str, turn_sep: str) -> Pieces:
  pieces: Pieces = [(f"{IM_START}system\n{system}{IM_END}{turn_sep}", False)]
  for user, answer in exchanges:
    pieces.append((f"{IM_START}user\n{user}{IM_END}{turn_sep}{IM_START}assistant\n", False))
    if answer is not None:
      pieces += [(answer + IM_END, True), (turn_sep, False)]
  return pieces


def _chatml(exchanges: Exchanges, bos: str, eos: str) -> Pieces:
  return _chatml_turns(exchanges, CHATML_SYSTEM, turn_sep="\n")


def _chatml_direct(exchanges: Exchanges, bos: str, eos: str) -> Pieces:
  return _chatml_turns(exchanges, CHATML_DIRECT_SYSTEM, turn_sep="")


def _llama_3_header(role: str) -> str:
  return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _llama_3(exchanges: Exchanges, bos: str, eos: str) -> Pieces:
  # conv_llava_llama_3 reuses conv_llava_llama_2's system prompt; the Llama-3 template trims each text.
  pieces: Pieces = [(f"{bos}{_llama_3_header('system')}{LLAMA_2_SYSTEM}{EOT}", False)]
  for user, answer in exchanges:
    pieces.append((f"{_llama_3_header('user')}{user.strip()}{EOT}{_llama_3_header('assistant')}", False))
    if answer is not None:
      pieces.append((answer.strip() + EOT, True))
  return pieces


_TEMPLATES: dict = {
    "plain": _plain,
    "vicuna_v1": _vicuna_v1,
    "llama_2": _llama_2,
    "mistral_instruct": _mistral_instruct,
    "chatml": _chatml,
    "chatml_direct": _chatml_direct,
    "llama_3": _llama_3,
}
TEMPLATE_NAMES = tuple(_TEMPLATES)


def check_template(name: str) -> str:
  if name not in _TEMPLATES:
    raise LlavaJaxError(f"data.template: unknown conversation template {name!r} "
                        f"(known: {', '.join(TEMPLATE_NAMES)})")
  return name


def _pairs(turns: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
  """(role, text) turns alternating human/gpt -> (user, answer) exchanges."""
  if not turns or len(turns) % 2:
    raise LlavaJaxError(f"conversation must alternate human/gpt and end with gpt, got {len(turns)} turn(s)")
  pairs = []
  for i in range(0, len(turns), 2):
    (role_u, user), (role_a, answer) = turns[i], turns[i + 1]
    if role_u != HUMAN or role_a != GPT:
      raise LlavaJaxError(f"conversation turns {i}, {i + 1} are {role_u!r}, {role_a!r}; expected human, gpt")
    pairs.append((user, answer))
  return pairs


def render(name: str, turns: Sequence[Tuple[str, str]], bos: str = "<s>", eos: str = "</s>") -> Rendered:
  """Renders (role, text) turns, role "human"/"gpt", into text and its target character spans."""
  pieces = _TEMPLATES[check_template(name)](_pairs(turns), bos or "", eos or "")
  spans, pos = [], 0
  for piece, target in pieces:
    if target:
      spans.append((pos, pos + len(piece)))
    pos += len(piece)
  text = "".join(piece for piece, _ in pieces)
  return Rendered(text, tuple(spans), has_bos=bool(bos) and text.startswith(bos))


def generation_prompt(name: str, user_text: str, history: Sequence[Tuple[str, str]] = (),
                      bos: str = "<s>", eos: str = "</s>") -> str:
  """The prompt for the next answer: earlier (user, answer) exchanges, then `user_text`.

  Ends exactly where the assistant's answer starts in training text, so a trained model sees the
  same tokens at inference. (`plain` keeps only the image tags: stage-1 models are captioners.)
  """
  exchanges = [(u, a) for u, a in history] + [(user_text, None)]
  return "".join(text for text, _ in _TEMPLATES[check_template(name)](exchanges, bos or "", eos or ""))


def tokenize(rendered: Rendered, tokenizer, image_token_id: Optional[int] = None
             ) -> Tuple[np.ndarray, np.ndarray]:
  """Tokenizes the whole text once; returns (input_ids int32 (L,), loss_mask float32 (L,)).

  `tokenizer` is a `tokenizers.Tokenizer` (a transformers fast tokenizer's `backend_tokenizer`);
  its post-processor adds BOS exactly as calling the transformers tokenizer with defaults does,
  unless the text starts with BOS itself (then, as apply_chat_template(tokenize=True), it adds none).
  loss_mask[t] = 1 when token t is a target (the model predicts it from position t - 1): when
  any of its characters lies in an answer span. A token straddling a span's end (possible when
  the end-of-turn marker is not a special token) is a target: generation must produce it to stop.
  """
  encoding = tokenizer.encode(rendered.text, add_special_tokens=not rendered.has_bos)
  ids = np.asarray(encoding.ids, np.int32)
  mask = np.zeros(len(ids), np.float32)
  spans = rendered.spans
  for t, (start, end) in enumerate(encoding.offsets):
    if end > start and any(start < s_end and end > s_start for s_start, s_end in spans):
      mask[t] = 1.0
  if image_token_id is not None:
    mask[ids == image_token_id] = 0.0  # belt and braces: an image token never carries loss
  return ids, mask


def backend_tokenizer(tokenizer):
  """The `tokenizers.Tokenizer` behind a transformers fast tokenizer (or the object itself)."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None and hasattr(tokenizer, "encode_batch"):
    backend = tokenizer
  if backend is None:
    raise LlavaJaxError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer "
                        "(training needs character offsets; add a tokenizer.json)")
  return backend

