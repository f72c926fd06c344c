"""One conversation through the three entry points (generate, chat, serve): one prompt, the reference's.

Each model folder is loaded as the commands load it (`run.load_session`). The same two-turn
conversation with an image in each user turn goes through `chat`'s Conversation and the server's
request preparation; `generate` takes one message, so its prompt is checked against the first turn.
With a chat template the reference is transformers' `LlavaProcessor.apply_chat_template`; with a
conversation template named in the checkpoint config it is a hand-written string, tokenized and
expanded by transformers' LlavaProcessor.
"""

import base64
import io
import json

import numpy as np
import pytest
import transformers
from PIL import Image

from hf_fixtures import tiny_hf_model
from llava_jax.data.images import ImageProcessor
from llava_jax.infer import run
from llava_jax.infer.chat import Conversation
from llava_jax.infer.serve.service import ChatService
from tokenizer_fixture import build_tiny_tokenizer

EXCHANGES = [("What is in the image?", "A red circle."), ("And in this one?", None)]
FIRST_TURN = [(EXCHANGES[0][0], None)]

# LLaVA-1.5-hf's chat template: images before text, the answer marked for assistant masks.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# Mistral-style: the template writes BOS and EOS itself (from the tokenizer's special tokens).
INST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
    " [/INST]{% else %}{% for c in message['content'] %}{{ ' ' + c['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}")

LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")
# `llama_2` as LLaVA's conversation.py writes it; the tokenizer's BOS separates the rounds.
LLAMA_2_FIRST = f"[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST]"
LLAMA_2_BOTH = LLAMA_2_FIRST + " A red circle. </s><s>[INST] <image>\nAnd in this one? [/INST]"


def _model_folder(path, chat_template=None, template_name=None):
  """A tiny HF LLaVA folder with a chat template, or a llava-jax config naming a conversation template."""
  tiny_hf_model(seed=3).save_pretrained(path)
  build_tiny_tokenizer(path)
  ImageProcessor.default(28).save(path)
  (path / "processor_config.json").write_text(json.dumps({
      "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 7,
      "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}))
  if chat_template is not None:
    (path / "chat_template.jinja").write_text(chat_template)
  if template_name is not None:
    config = json.loads((path / "config.json").read_text())
    config["llava_jax"] = {"template": template_name}
    (path / "config.json").write_text(json.dumps(config))
  return path


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(30, 40), (52, 28)]]


def _data_url(image) -> str:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")  # lossless: the server decodes the same pixels
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _through_generate(session, images):
  """What `llava-jax generate --image IMG --prompt Q` feeds the engine."""
  inputs = session.processor.prepare(EXCHANGES[0][0], images[:1])
  return inputs.input_ids, inputs.pixel_values


def _through_chat(session, images):
  """`llava-jax chat`: `/image IMG1`, question, answer, `/image IMG2`, question -> both prompts."""
  conversation, prompts = Conversation(session), []
  for image, (question, answer) in zip(images, EXCHANGES):
    conversation.pending.append(image)
    prompt = conversation.prompt(question)
    prompts.append((prompt.input_ids, prompt.pixel_values))
    conversation.answered(question, answer)
  return prompts


def _through_server(session, images, exchanges):
  """POST /v1/chat/completions with the exchanges as OpenAI messages -> the prompt the batcher gets."""
  messages = []
  for image, (question, answer) in zip(images, exchanges):
    messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                                 {"type": "text", "text": question}]})
    if answer is not None:
      messages.append({"role": "assistant", "content": answer})
  service = ChatService(session, "tiny")
  prepared = service.prepare(json.dumps({"model": "tiny", "messages": messages, "max_tokens": 4}).encode())
  return prepared.prompt.input_ids, prepared.prompt.pixel_values


def _hf_messages(images, exchanges):
  messages = []
  for image, (question, answer) in zip(images, exchanges):
    messages.append({"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": question}]})
    if answer is not None:
      messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
  return messages


def _assert_prompt(got, expected):
  input_ids, pixel_values = got
  np.testing.assert_array_equal(input_ids, expected["input_ids"][0])
  np.testing.assert_array_equal(pixel_values, np.asarray(expected["pixel_values"]).transpose(0, 2, 3, 1))


def _assert_entry_points_agree(session, images, first, both):
  """generate, chat and serve produce `first` for the first turn, chat and serve `both` for the two."""
  chat_first, chat_both = _through_chat(session, images)
  for got in (_through_generate(session, images), chat_first, _through_server(session, images, FIRST_TURN)):
    _assert_prompt(got, first)
  for got in (chat_both, _through_server(session, images, EXCHANGES)):
    _assert_prompt(got, both)
  assert (chat_both[0] == session.processor.image_token_id).sum() == 2 * session.engine.config.image_seq_length


@pytest.mark.parametrize("chat_template", [LLAVA_15_TEMPLATE, INST_TEMPLATE], ids=["llava_1_5", "inst_bos"])
def test_entry_points_render_the_chat_template_as_transformers(tmp_path, images, chat_template):
  folder = _model_folder(tmp_path, chat_template=chat_template)
  session = run.load_session(str(folder))
  reference = transformers.LlavaProcessor.from_pretrained(str(folder), local_files_only=True)

  def rendered(exchanges):
    return reference.apply_chat_template(_hf_messages(images, exchanges), add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="np")

  _assert_entry_points_agree(session, images, rendered(FIRST_TURN), rendered(EXCHANGES))


def test_entry_points_render_the_named_conversation_template(tmp_path, images):
  folder = _model_folder(tmp_path, template_name="llama_2")
  session = run.load_session(str(folder))
  assert session.processor.chat_template is None
  reference = transformers.LlavaProcessor.from_pretrained(str(folder), local_files_only=True)
  first = reference(text=LLAMA_2_FIRST, images=images[:1], return_tensors="np")
  both = reference(text=LLAMA_2_BOTH, images=images, return_tensors="np")
  _assert_entry_points_agree(session, images, first, both)
