"""The demo's tokenizer: a small BPE trained on the ShapesWorld text corpus, saved as a
transformers `PreTrainedTokenizerFast` folder (what `llava-jax train`/`generate` load).

LLaMA-like conventions so the real code paths treat it as they treat Vicuna's: `<pad>`=0,
`<s>`=1 (added by the post-processor), `</s>`=2, `<unk>`=3, and `<image>` as one special token.
The chat template renders exactly what the `vicuna_v1` training template renders, so `generate`
prompts the model with the tokens it was trained on.
"""

from __future__ import annotations

import os
from typing import Iterable

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

# Jinja twin of llava_jax.data.templates' vicuna_v1 (system, "USER: ... ASSISTANT: answer</s>").
VICUNA_CHAT_TEMPLATE = (
    "{{ 'A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human\\'s questions. ' }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set ns = namespace(text='') %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set ns.text = ns.text + '<image>\\n' %}"
    "{% else %}{% set ns.text = ns.text + part['text'] %}{% endif %}{% endfor %}"
    "{% set text = ns.text %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + text + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + text + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def train_tokenizer(texts: Iterable[str], folder: str, vocab_size: int = 512):
  """Trains the BPE on `texts`, saves the tokenizer files to `folder` and returns the
  transformers tokenizer."""
  import transformers  # pylint: disable=import-outside-toplevel  (slow import)
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # pylint: disable=import-outside-toplevel

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  # SentencePiece-style word boundaries ("▁red"), as LLaMA's tokenizer has them.
  tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
  tok.decoder = decoders.Metaspace(prepend_scheme="first")
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
  tok.train_from_iterator(texts, trainer)
  bos = tok.token_to_id("<s>")
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", bos)])
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
      extra_special_tokens={"image_token": "<image>"}, padding_side="left")
  tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
  os.makedirs(folder, exist_ok=True)
  tokenizer.save_pretrained(folder)
  return tokenizer
