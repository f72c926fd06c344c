"""Tiny tokenizers built in-process (no downloads).

`build_tiny_tokenizer`: a LLaMA-like BPE tokenizer, saved as a model folder would have it. Ids:
<pad>=0, <s>=1, </s>=2, <unk>=3, <image>=vocab_size-1 (127 by default, as tests/hf_fixtures.py's
tiny models expect); BOS is added by the post-processor, as LLaMA's tokenizer does.
`build_word_tokenizer`: one token per whitespace-separated word, so expected token lists can be
written by hand.
"""

import os

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
IMAGE_TOKEN = "<image>"

DEFAULT_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is in the image?\nASSISTANT: A red circle above a blue square.",
    "USER: How many shapes are there?\nASSISTANT: There are three shapes: two triangles and one star.",
    "Is there a green cat in the picture? Yes. No. Left, right, top, bottom, center.",
    "The quick brown fox jumps over the lazy dog 0123456789 times!",
]


def build_tiny_tokenizer(folder, corpus=None, vocab_size=128):
  """Trains a small BPE tokenizer, saves tokenizer files to `folder`, returns the transformers one."""
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
  tok.decoder = decoders.Metaspace(prepend_scheme="first")
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=SPECIAL_TOKENS,
                                show_progress=False)
  tok.train_from_iterator(corpus or DEFAULT_CORPUS, trainer)
  # A small corpus may stop short of the target size; filler tokens keep <image> at the last id.
  filler = vocab_size - 1 - tok.get_vocab_size()
  if filler < 0:
    raise ValueError(f"vocab_size {vocab_size} too small for the alphabet of the corpus")
  tok.add_tokens([f"<unused{i}>" for i in range(filler)])
  tok.add_special_tokens([IMAGE_TOKEN])
  bos_id = tok.token_to_id("<s>")
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
  os.makedirs(folder, exist_ok=True)
  tokenizer.save_pretrained(folder)
  return tokenizer


def build_word_tokenizer(texts, special_tokens, bos_token=None, eos_token=None, chat_template=None):
  """Every whitespace-separated word of `texts` is one token; `special_tokens` (with "<unk>" and
  "<pad>") split words as a real tokenizer's do. BOS, when given, is added by the post-processor."""
  for special in special_tokens:
    texts = [t.replace(special, " ") for t in texts]
  words = sorted({w for t in texts for w in t.split()})
  vocab = {tok: i for i, tok in enumerate(list(special_tokens) + words)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(list(special_tokens))
  if bos_token:
    tok.post_processor = processors.TemplateProcessing(single=f"{bos_token} $A",
                                                       special_tokens=[(bos_token, vocab[bos_token])])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token,
                                              pad_token="<pad>", unk_token="<unk>", chat_template=chat_template)
