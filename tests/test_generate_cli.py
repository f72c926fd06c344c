"""`llava-jax generate` and `chat` as subprocesses on a tiny HF folder, against transformers end to end."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from hf_fixtures import tiny_hf_model
from llava_jax.data.images import ImageProcessor
from llava_jax.data.layouts import FixedLayout
from llava_jax.data.processor import Processor
from llava_jax.infer.chat import Conversation
from tokenizer_fixture import build_tiny_tokenizer
from xla_flags import without_device_count

MAX_NEW = 12
QUESTION = "What is in the image?"
TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A complete HF LLaVA folder: weights, tokenizer, image processor, processor config, chat template."""
  path = tmp_path_factory.mktemp("model")
  model = tiny_hf_model(seed=3)
  model.generation_config.eos_token_id = 2
  model.generation_config.pad_token_id = 0
  model.save_pretrained(path)
  build_tiny_tokenizer(path)
  ImageProcessor.default(28).save(path)
  (path / "processor_config.json").write_text(json.dumps({
      "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 7,
      "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}))
  (path / "chat_template.jinja").write_text(TEMPLATE)
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(path / "img.png")
  (path / "bad.png").write_bytes(b"this is not a png")
  return path


def _run(folder, *args, stdin=None):
  # A persistent compilation cache: runs in one worker reuse the programs an earlier run compiled.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(folder / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS=without_device_count(os.environ["XLA_FLAGS"]))
  return subprocess.run([sys.executable, "-m", "llava_jax", *args], input=stdin, capture_output=True, text=True,
                        env=env, timeout=300)


def _transformers_answer(folder, question, dtype=torch.float32):
  processor = transformers.LlavaProcessor.from_pretrained(str(folder), local_files_only=True)
  model = transformers.LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=dtype).eval()
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
  text = processor.apply_chat_template(messages, add_generation_prompt=True)
  inputs = processor(images=[Image.open(folder / "img.png")], text=text, return_tensors="pt")
  with torch.no_grad():
    out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
  return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def expected(folder):
  answer = _transformers_answer(folder, QUESTION)
  assert answer.strip()  # the comparisons mean something only if text was produced
  return answer + "\n"


def test_generate_matches_transformers(folder, expected):
  result = _run(folder, "generate", "--model", str(folder), "--image", str(folder / "img.png"),
                "--prompt", QUESTION, "--max-new-tokens", str(MAX_NEW))
  assert result.returncode == 0, result.stderr
  assert result.stdout == expected


def test_generate_in_bfloat16_matches_transformers_in_bfloat16(folder):
  """--dtype bfloat16 from a float32 folder (converted on the host) against transformers' torch_dtype=bfloat16."""
  result = _run(folder, "generate", "--model", str(folder), "--image", str(folder / "img.png"),
                "--prompt", QUESTION, "--max-new-tokens", str(MAX_NEW), "--dtype", "bfloat16")
  assert result.returncode == 0, result.stderr
  assert result.stdout == _transformers_answer(folder, QUESTION, torch.bfloat16) + "\n"


def test_chat_answers_resets_and_quits(folder, expected):
  """/image + question, /reset, the same again: both answers equal transformers' (no history leaks)."""
  image = folder / "img.png"
  script = f"/image {image}\n{QUESTION}\n/reset\n/image {image}\n{QUESTION}\n/quit\nnever asked\n"
  result = _run(folder, "chat", "--model", str(folder), "--max-new-tokens", str(MAX_NEW), stdin=script)
  assert result.returncode == 0, result.stderr
  assert result.stdout == expected * 2


def test_chat_keeps_history(folder):
  """The second turn's prompt holds the first exchange, its image, and the new question."""
  processor = Processor.from_folder(folder, FixedLayout(16))
  session = types.SimpleNamespace(processor=processor)
  conversation = Conversation(session)
  conversation.pending.append(Image.open(folder / "img.png"))
  conversation.prompt(QUESTION)
  conversation.answered(QUESTION, "A red circle.")
  second = processor.decode(conversation.prompt("And the color?").input_ids)
  assert second.replace("<image>", "").split() == (
      f"USER: {QUESTION} ASSISTANT: A red circle. USER: And the color? ASSISTANT:").split()
  assert list(conversation.prompt("x").input_ids).count(127) == 16  # the one image, kept


@pytest.mark.parametrize("args,message", [
    (["--image", "{folder}/bad.png", "--prompt", "hi"], "bad.png"),
    (["--image", "{folder}/missing.png", "--prompt", "hi"], "missing.png"),
    (["--image", "{folder}/img.png", "--prompt", "no tag", "--raw"], "has 0 <image> tag(s) but 1 image"),
    (["--prompt", "hi", "--dtype", "float16"], "--dtype"),
])
def test_generate_bad_input_exits_2(folder, args, message):
  assert_generate_exits_2(folder, args, message)


def assert_generate_exits_2(folder, args, message):
  """`generate --model folder ARGS` ({folder} filled in) exits 2 with one stderr line holding `message`."""
  result = _run(folder, "generate", "--model", str(folder), *[a.format(folder=folder) for a in args])
  assert result.returncode == 2 and result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr


def test_generate_missing_model_exits_2(tmp_path):
  result = _run(tmp_path, "generate", "--model", str(tmp_path / "nothing"), "--prompt", "hi")
  assert result.returncode == 2 and "nothing" in result.stderr.strip()
