"""LLaVA-NeXT conversation templates (`llama_3`, `chatml`, `chatml_direct`) against their references.

(a) the generation prompt the one conversation renderer writes from the named template equals
transformers' `apply_chat_template(..., add_generation_prompt=True)` with the model's real jinja
template (copied below from the public tokenizer_config.json files), or, for `chatml_direct`, the
prompt LLaVA documents for llava-v1.6-34b; (b) the label mask marks exactly the hand-counted
answer and end-of-turn positions; (c) the training tokens (the pipeline's Preprocess) and the
generation tokens (the processor's path) agree on every token up to the answer.
"""

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import conversation, templates
from llava_jax.data.conversation import IMAGE, Turn
from llava_jax.data.images import ImageProcessor
from llava_jax.data.pipeline import Preprocess
from llava_jax.data.layouts import FixedLayout
from llava_jax.data.processor import Processor
from llava_jax.data.templates import GPT, HUMAN

from tokenizer_fixture import build_tiny_tokenizer, build_word_tokenizer

# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json "chat_template": the template LLaVA-NeXT's
# preprocess_llama3 trains llama3-llava-next-8b with (conv_llava_llama_3's tokenizer).
LLAMA_3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen/Qwen2-7B-Instruct tokenizer_config.json "chat_template" (Qwen NeXT models: llava-next-72b/110b).
QWEN2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# conv_llava_llama_3's system prompt (LLaVA-NeXT llava/conversation.py).
LLAVA_LLAMA_3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using "
                        "natural language.")

LLAMA_3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]
SEQ = 2  # image tokens per image in these tests
QUESTION, ANSWER, FOLLOW_UP, LAST_ANSWER = "What is it?", "A red circle.", "How many?", "One."
TRAINING = [(HUMAN, f"<image>\n{QUESTION}"), (GPT, ANSWER), (HUMAN, FOLLOW_UP), (GPT, LAST_ANSWER)]
# The renderer's conversation up to the second answer: an image in the first user turn.
TURNS = [Turn("user", (IMAGE, QUESTION)), Turn("assistant", (ANSWER,)), Turn("user", (FOLLOW_UP,))]


def word_tokenizer(bos=None, chat_template=None):
  """Word-level (positions countable by hand) with the chat special tokens; BOS, when given, added
  by the post-processor as Llama-3's tokenizer does."""
  texts = [templates.render(name, TRAINING, bos or "").text for name in ("llama_3", "chatml", "chatml_direct")]
  specials = ["<unk>", "<pad>", "<image>"] + LLAMA_3_SPECIALS + CHATML_SPECIALS
  return build_word_tokenizer(texts, specials, bos_token=bos, chat_template=chat_template)


def bpe_tokenizer(tmp_path):
  """tokenizer_fixture's BPE tokenizer (BOS "<s>"), trained on the NeXT texts, chat tokens added."""
  corpus = [templates.render(n, TRAINING, "<s>").text for n in ("llama_3", "chatml", "chatml_direct")]
  tokenizer = build_tiny_tokenizer(tmp_path / "tok", corpus=corpus)
  tokenizer.add_tokens(LLAMA_3_SPECIALS[1:] + CHATML_SPECIALS, special_tokens=True)
  return tokenizer


def hf_messages(system=None):
  messages = [{"role": "system", "content": system}] if system else []
  return messages + [{"role": "user", "content": f"<image>\n{QUESTION}"}, {"role": "assistant", "content": ANSWER},
                     {"role": "user", "content": FOLLOW_UP}]


def generation_ids(tokenizer, name, image_seq_length):
  """The token ids `generate`/`chat`/`serve` feed the model for TURNS (the processor's own path)."""
  processor = Processor(tokenizer, ImageProcessor.default(28), FixedLayout(image_seq_length), fallback_template=name)
  image = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
  return processor.encode_conversation(TURNS, [image]).input_ids.tolist()


@pytest.mark.parametrize("name, jinja, system, bos", [
    ("llama_3", LLAMA_3_JINJA, LLAVA_LLAMA_3_SYSTEM, "<|begin_of_text|>"),
    ("chatml", QWEN2_JINJA, None, None),
], ids=["llama_3", "chatml"])
def test_generation_prompt_equals_the_models_chat_template(name, jinja, system, bos):
  tokenizer = word_tokenizer(bos, chat_template=jinja)
  expected = tokenizer.apply_chat_template(hf_messages(system), tokenize=False, add_generation_prompt=True)
  prompt = conversation.render(TURNS, None, name, special_tokens=tokenizer.special_tokens_map)
  assert prompt == expected
  # Tokenized as the processor tokenizes it (one BOS, however the template and tokenizer write it).
  expected_ids = tokenizer.apply_chat_template(hf_messages(system), tokenize=True, add_generation_prompt=True)
  assert generation_ids(tokenizer, name, image_seq_length=1) == expected_ids["input_ids"]


def test_chatml_direct_is_llava_v1_6_34b_prompt():
  # The llava-v1.6-34b prompt LLaVA and llava-hf document (transformers' conversion script checks it
  # against the original model's input ids), then a second round as conv_chatml_direct (MPT separator
  # style: role + message + "<|im_end|>", nothing between turns) writes it.
  first = ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown in this "
           "image?<|im_end|><|im_start|>assistant\n")
  assert templates.generation_prompt("chatml_direct", "<image>\nWhat is shown in this image?") == first
  both = ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|>"
          "<|im_start|>assistant\nA red circle.<|im_end|><|im_start|>user\nHow many?<|im_end|><|im_start|>assistant\n")
  assert conversation.render(TURNS, None, "chatml_direct") == both


def test_llama_3_trims_texts_as_its_template_does():
  tokenizer = word_tokenizer("<|begin_of_text|>", chat_template=LLAMA_3_JINJA)
  messages = [{"role": "system", "content": LLAVA_LLAMA_3_SYSTEM}, {"role": "user", "content": "  Hi there \n"},
              {"role": "assistant", "content": " Hello. "}, {"role": "user", "content": "\nBye"}]
  expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  history = [("  Hi there \n", " Hello. ")]
  assert templates.generation_prompt("llama_3", "\nBye", history, bos="<|begin_of_text|>") == expected


@pytest.mark.parametrize("name, bos, targets", [
    # <|begin_of_text|> 0, system header 1-3, 32 system words 4-35, <|eot_id|> 36, user header 37-39,
    # <image> x2 40-41, "What is it?" 42-44, <|eot_id|> 45, assistant header 46-48, "A red circle." 49-51,
    # <|eot_id|> 52, user header 53-55, "How many?" 56-57, <|eot_id|> 58, assistant header 59-61, "One." 62,
    # <|eot_id|> 63.
    ("llama_3", "<|begin_of_text|>", [49, 50, 51, 52, 62, 63]),
    # <|im_start|> system 0-1, "You are a helpful assistant." 2-6, <|im_end|> 7, <|im_start|> user 8-9,
    # <image> x2 10-11, "What is it?" 12-14, <|im_end|> 15, <|im_start|> assistant 16-17, answer 18-20,
    # <|im_end|> 21, <|im_start|> user 22-23, "How many?" 24-25, <|im_end|> 26, <|im_start|> assistant 27-28,
    # "One." 29, <|im_end|> 30 (the "\n" after each <|im_end|> is whitespace to this tokenizer).
    ("chatml", None, [18, 19, 20, 21, 29, 30]),
    # <|im_start|> system 0-1, "Answer the questions." 2-4, <|im_end|> 5, <|im_start|> user 6-7, <image> x2 8-9,
    # "What is it?" 10-12, <|im_end|> 13, <|im_start|> assistant 14-15, answer 16-18, <|im_end|> 19,
    # <|im_start|> user 20-21, "How many?" 22-23, <|im_end|> 24, <|im_start|> assistant 25-26, "One." 27,
    # <|im_end|> 28.
    ("chatml_direct", None, [16, 17, 18, 19, 27, 28]),
])
def test_mask_is_answers_and_end_of_turn(name, bos, targets):
  tokenizer = word_tokenizer(bos)
  expanded = [(role, text.replace("<image>", "<image>" * SEQ)) for role, text in TRAINING]
  rendered = templates.render(name, expanded, bos or "")
  ids, mask = templates.tokenize(rendered, tokenizer.backend_tokenizer, tokenizer.convert_tokens_to_ids("<image>"))
  assert "<unk>" not in tokenizer.convert_ids_to_tokens(ids.tolist())
  assert np.flatnonzero(mask).tolist() == targets
  end_of_turn = "<|eot_id|>" if name == "llama_3" else "<|im_end|>"
  assert tokenizer.convert_ids_to_tokens(ids[targets].tolist()) == ["A", "red", "circle.", end_of_turn,
                                                                     "One.", end_of_turn]
  if bos:  # one BOS: the template writes it, so the tokenizer's post-processor must not add another
    assert ids[0] == tokenizer.bos_token_id and (ids == tokenizer.bos_token_id).sum() == 1


@pytest.mark.parametrize("name", ["llama_3", "chatml", "chatml_direct"])
@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_training_and_generation_agree_up_to_the_answer(tmp_path, name, kind):
  tokenizer = word_tokenizer("<|begin_of_text|>") if kind == "word" else bpe_tokenizer(tmp_path)
  preprocess = Preprocess(name, tokenizer, image_processor=None, layout=FixedLayout(SEQ), max_len=512, max_images=1)
  train_ids, mask = preprocess.encode(TRAINING, [SEQ])
  prompt_ids = generation_ids(tokenizer, name, image_seq_length=SEQ)
  n = len(prompt_ids)
  assert train_ids[:n].tolist() == prompt_ids
  # The prompt carries loss only on the first answer; the token after it starts the second answer.
  first_answer = tokenizer.decode(train_ids[:n][mask[:n] == 1].tolist()).replace(" ", "")
  assert first_answer == "Aredcircle." + ("<|eot_id|>" if name == "llama_3" else "<|im_end|>")
  assert mask[n] == 1 and tokenizer.decode(train_ids[n:][mask[n:] == 1].tolist()).replace(" ", "").startswith("One.")
  assert (train_ids == tokenizer.bos_token_id).sum() == 1
