"""Conversation templates: rendered text, and the loss mask checked token by token by hand.

A word-level tokenizer (every whitespace-separated word one token) makes the expected token
lists writable by hand; the BPE fixture tokenizer then checks the same rules on subword tokens.
"""

import numpy as np
import pytest

from llava_jax.data import templates
from llava_jax.data.templates import GPT, HUMAN
from llava_jax.errors import LlavaJaxError

from tokenizer_fixture import build_tiny_tokenizer, build_word_tokenizer

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]
IMG = "<image>"
IM_END = templates.IM_END
SEQ = 2  # image tokens per image in these tests

CONVERSATION = [(HUMAN, "<image>\nWhat is it?"), (GPT, "A red circle."),
                (HUMAN, "How many?"), (GPT, "One.")]


def masked_tokens(name, turns):
  expanded = [(r, v.replace(IMG, IMG * SEQ)) for r, v in turns]
  rendered = templates.render(name, expanded)
  tokenizer = build_word_tokenizer([rendered.text], SPECIALS, bos_token="<s>", eos_token="</s>")
  image_id = tokenizer.convert_tokens_to_ids(IMG)
  ids, mask = templates.tokenize(rendered, tokenizer.backend_tokenizer, image_id)
  assert ids.tolist() == tokenizer(rendered.text)["input_ids"]  # same as the tokenizer's defaults
  assert not mask[ids == image_id].any()
  assert "<unk>" not in tokenizer.convert_ids_to_tokens(ids.tolist())
  return list(zip(tokenizer.convert_ids_to_tokens(ids.tolist()), mask.astype(int).tolist())), rendered


def zeros(text):
  return [(w, 0) for w in text.split()]


def ones(text):
  return [(w, 1) for w in text.split()]


def test_vicuna_v1_mask_token_by_token():
  got, rendered = masked_tokens("vicuna_v1", CONVERSATION)
  assert rendered.text == (templates.VICUNA_SYSTEM + " USER: <image><image>\nWhat is it? ASSISTANT: "
                           "A red circle.</s>USER: How many? ASSISTANT: One.</s>")
  expected = ([("<s>", 0)] + zeros(templates.VICUNA_SYSTEM) + zeros("USER: <image> <image> What is it? ASSISTANT:")
              + ones("A red circle. </s>") + zeros("USER: How many? ASSISTANT:") + ones("One. </s>"))
  assert got == expected


def test_plain_mask_token_by_token():
  turns = [(HUMAN, "Describe <image> briefly."), (GPT, "A red circle."), (HUMAN, "More?"), (GPT, "Blue square.")]
  got, rendered = masked_tokens("plain", turns)
  assert rendered.text == "<image><image>A red circle.</s>Blue square.</s>"
  assert got == [("<s>", 0), ("<image>", 0), ("<image>", 0)] + ones("A red circle. </s> Blue square. </s>")


def test_chatml_mask_token_by_token():
  got, rendered = masked_tokens("chatml", CONVERSATION)
  assert rendered.text.endswith("<|im_start|>assistant\nOne.<|im_end|>\n")
  expected = ([("<s>", 0)] + zeros("<|im_start|> system You are a helpful assistant. <|im_end|>")
              + zeros("<|im_start|> user <image> <image> What is it? <|im_end|> <|im_start|> assistant")
              + ones("A red circle. <|im_end|>")
              + zeros("<|im_start|> user How many? <|im_end|> <|im_start|> assistant") + ones("One. <|im_end|>"))
  assert got == expected


def test_llama_2_and_mistral_masks():
  got, rendered = masked_tokens("llama_2", CONVERSATION)
  assert rendered.text.startswith("[INST] <<SYS>>\n" + templates.LLAMA_2_SYSTEM + "\n<</SYS>>\n\n<image>")
  expected = ([("<s>", 0)] + zeros("[INST] <<SYS>> " + templates.LLAMA_2_SYSTEM + " <</SYS>>")
              + zeros("<image> <image> What is it? [/INST]") + ones("A red circle. </s>")
              + zeros("<s> [INST] How many? [/INST]") + ones("One. </s>"))
  assert got == expected
  got, rendered = masked_tokens("mistral_instruct", CONVERSATION)
  assert rendered.text == "[INST] <image><image>\nWhat is it? [/INST] A red circle. </s>[INST] How many? [/INST] One. </s>"
  assert got == ([("<s>", 0)] + zeros("[INST] <image> <image> What is it? [/INST]") + ones("A red circle. </s>")
                 + zeros("[INST] How many? [/INST]") + ones("One. </s>"))


def test_generation_prompt_is_the_training_prefix():
  history = [("<image>\nWhat is it?", "A red circle.")]
  assert templates.generation_prompt("vicuna_v1", "How many?", history) == (
      templates.VICUNA_SYSTEM + " USER: <image>\nWhat is it? ASSISTANT: A red circle.</s>USER: How many? ASSISTANT:")
  assert templates.generation_prompt("chatml", "Hi").endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert templates.generation_prompt("llama_2", "Hi").endswith("Hi [/INST]")
  assert templates.generation_prompt("plain", "<image>\nDescribe.") == "<image>"
  for name in templates.TEMPLATE_NAMES:
    full = templates.render(name, CONVERSATION).text
    assert full.startswith(templates.generation_prompt(name, "How many?", [("<image>\nWhat is it?", "A red circle.")]))


def test_bpe_tokenizer_masks_only_answers(tmp_path):
  corpus = [templates.render(n, CONVERSATION).text for n in templates.TEMPLATE_NAMES]
  tokenizer = build_tiny_tokenizer(tmp_path / "tok", corpus=corpus)
  # The chat special tokens, as ChatML and Llama-3 tokenizers have them.
  tokenizer.add_tokens([templates.IM_START, templates.IM_END, templates.EOT, "<|start_header_id|>",
                        "<|end_header_id|>"], special_tokens=True)
  image_id = tokenizer.convert_tokens_to_ids(IMG)
  backend = tokenizer.backend_tokenizer
  for name in templates.TEMPLATE_NAMES:
    expanded = [(r, v.replace(IMG, IMG * SEQ)) for r, v in CONVERSATION]
    rendered = templates.render(name, expanded, tokenizer.bos_token, tokenizer.eos_token)
    ids, mask = templates.tokenize(rendered, backend, image_id)
    # apply_chat_template(tokenize=True)'s rule: no second BOS when the text starts with one (llama_3).
    assert ids.tolist() == tokenizer(rendered.text, add_special_tokens=not rendered.has_bos)["input_ids"]
    assert (ids == tokenizer.bos_token_id).sum() == 1 + (name == "llama_2")  # llama_2 opens round 2 with BOS
    assert (ids == image_id).sum() == SEQ and not mask[ids == image_id].any()
    end_of_turn = {"chatml": IM_END, "chatml_direct": IM_END, "llama_3": templates.EOT}.get(name, "</s>")
    # The masked tokens decode to the answers and their end-of-turn markers, nothing else.
    target = tokenizer.decode(ids[mask == 1].tolist()).replace(" ", "")
    assert target == f"Aredcircle.{end_of_turn}One.{end_of_turn}", (name, target)
    # Inference tokenization of the prompt is a prefix of the training tokenization.
    prompt = templates.generation_prompt(name, CONVERSATION[0][1].replace(IMG, IMG * SEQ),
                                         bos=tokenizer.bos_token, eos=tokenizer.eos_token)
    prompt_ids = tokenizer(prompt, add_special_tokens=not prompt.startswith(tokenizer.bos_token))["input_ids"]
    assert ids[:len(prompt_ids)].tolist() == prompt_ids, name


def test_bad_conversations_and_names():
  with pytest.raises(LlavaJaxError, match="unknown conversation template"):
    templates.render("vicuna", CONVERSATION)
  with pytest.raises(LlavaJaxError, match="alternate"):
    templates.render("vicuna_v1", CONVERSATION[:3])
  with pytest.raises(LlavaJaxError, match="expected human, gpt"):
    templates.render("vicuna_v1", [(GPT, "a"), (HUMAN, "b")])
  assert np.asarray(templates.TEMPLATE_NAMES).size == 7
