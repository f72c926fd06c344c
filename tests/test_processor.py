"""The inference processor against transformers' LlavaProcessor built from the same folder."""

import json
import subprocess
import sys

import numpy as np
import pytest
import transformers
from PIL import Image

from llava_jax.data import processor as processor_lib
from llava_jax.data.images import ImageProcessor
from llava_jax.data.layouts import FixedLayout
from llava_jax.data.processor import Processor
from llava_jax.errors import LlavaJaxError
from tokenizer_fixture import build_tiny_tokenizer

CROP, PATCH = 28, 14
# vision_feature_select_strategy "default" drops the class token: (28 // 14) ** 2 + 1 - 1 tokens.
IMAGE_SEQ_LENGTH = 4
LAYOUT = FixedLayout(IMAGE_SEQ_LENGTH)

# LLaVA-1.5-hf's template shape: role, image lines, then text; no BOS (the tokenizer adds it).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# A template that writes BOS itself (as Mistral/LLaMA-3 ones do): apply_chat_template then
# tokenizes without special tokens, so there is one BOS, not two.
BOS_TEMPLATE = "{{ bos_token }}" + LLAVA_TEMPLATE


def _model_folder(path, chat_template=LLAVA_TEMPLATE):
  build_tiny_tokenizer(path)
  ImageProcessor.default(CROP).save(path)
  processor_config = {"image_token": "<image>", "num_additional_image_tokens": 1,
                      "patch_size": PATCH, "processor_class": "LlavaProcessor",
                      "vision_feature_select_strategy": "default"}
  (path / "processor_config.json").write_text(json.dumps(processor_config))
  if chat_template is not None:
    (path / "chat_template.jinja").write_text(chat_template)
  return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def reference(folder):
  return transformers.LlavaProcessor.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def ours(folder):
  return Processor.from_folder(folder, LAYOUT)


def _images(*sizes):
  rng = np.random.default_rng(sum(h * w for h, w in sizes))
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _nhwc(pixel_values):
  return np.asarray(pixel_values).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("prompt,sizes", [
    ("USER: <image>\nWhat is in the image? ASSISTANT:", [(40, 30)]),
    ("USER: <image>\n<image>\nHow many shapes are there? ASSISTANT:", [(40, 30), (20, 64)]),
    ("Left <image> and right <image> images.", [(28, 28), (90, 33)]),
    ("USER: What is in the image? ASSISTANT:", []),
])
def test_encode_matches_llava_processor(ours, reference, prompt, sizes):
  imgs = _images(*sizes)
  expected = reference(text=prompt, images=imgs or None, return_tensors="np")
  got = ours.encode(prompt, imgs)
  assert got.input_ids.dtype == np.int32
  np.testing.assert_array_equal(got.input_ids, expected["input_ids"][0])
  assert got.input_ids[0] == ours.tokenizer.bos_token_id  # the tokenizer's own BOS
  assert (got.input_ids == 127).sum() == len(sizes) * IMAGE_SEQ_LENGTH
  if imgs:
    np.testing.assert_array_equal(got.pixel_values, _nhwc(expected["pixel_values"]))
  assert got.pixel_values.shape == (len(sizes), CROP, CROP, 3)


def test_encode_batch_left_padding(ours, reference):
  prompts = ["USER: <image>\nWhat? ASSISTANT:", "Hi", "USER: <image>\n<image>\nHow many? ASSISTANT:"]
  imgs = [_images((30, 40)), [], _images((50, 20), (28, 28))]
  reference.tokenizer.padding_side = "left"
  expected = reference(text=prompts, images=[i for row in imgs for i in row], padding=True,
                       return_tensors="np")
  got = ours.encode_batch(prompts, imgs)
  np.testing.assert_array_equal(got.input_ids, expected["input_ids"])
  np.testing.assert_array_equal(got.attention_mask, expected["attention_mask"])
  np.testing.assert_array_equal(got.pixel_values, _nhwc(expected["pixel_values"]))
  assert got.input_ids[1, 0] == ours.pad_token_id == 0
  wider = ours.encode_batch(prompts, imgs, length=got.input_ids.shape[1] + 3)
  np.testing.assert_array_equal(wider.input_ids[:, 3:], got.input_ids)
  assert not wider.attention_mask[:, :3].any()
  with pytest.raises(LlavaJaxError, match="does not fit the length 2"):
    ours.encode_batch(prompts, imgs, length=2)


@pytest.mark.parametrize("template", [LLAVA_TEMPLATE, BOS_TEMPLATE], ids=["no_bos", "bos"])
@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_chat_template_matches_apply_chat_template(tmp_path, template, num_images):
  folder = _model_folder(tmp_path, template)
  reference = transformers.LlavaProcessor.from_pretrained(str(folder), local_files_only=True)
  ours = Processor.from_folder(folder, LAYOUT)
  imgs = _images(*[(30 + 7 * i, 40) for i in range(num_images)])
  text = "What is in the image?"
  content = [{"type": "image", "image": img} for img in imgs] + [{"type": "text", "text": text}]
  conversation = [{"role": "user", "content": content}]
  prompt = ours.format_prompt(text, num_images)
  assert prompt == reference.apply_chat_template(conversation, add_generation_prompt=True)
  expected = reference.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="np")
  got = ours.prepare(text, imgs)
  np.testing.assert_array_equal(got.input_ids, expected["input_ids"][0])
  assert (got.input_ids == ours.tokenizer.bos_token_id).sum() == 1
  if imgs:
    np.testing.assert_array_equal(got.pixel_values, _nhwc(expected["pixel_values"]))


def test_saved_by_transformers_folder(tmp_path, reference):
  # transformers 5 saves the image processor nested in processor_config.json, no preprocessor_config.
  reference.save_pretrained(tmp_path)
  assert not (tmp_path / "preprocessor_config.json").exists()
  ours = Processor.from_folder(tmp_path, LAYOUT)
  assert ours.image_processor == ImageProcessor.default(CROP)
  assert ours.chat_template == LLAVA_TEMPLATE
  imgs = _images((33, 44))
  got = ours.prepare("Describe.", imgs)
  expected = reference(text="USER: <image>\nDescribe. ASSISTANT:", images=imgs, return_tensors="np")
  np.testing.assert_array_equal(got.input_ids, expected["input_ids"][0])


def test_fallback_template_without_chat_template(tmp_path):
  ours = Processor.from_folder(_model_folder(tmp_path, chat_template=None), LAYOUT)
  assert ours.chat_template is None
  system = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
            "gives helpful, detailed, and polite answers to the human's questions.")
  assert ours.format_prompt("What is this?", 1) == f"{system} USER: <image>\nWhat is this? ASSISTANT:"
  assert ours.format_prompt("Compare.", 2) == f"{system} USER: <image>\n<image>\nCompare. ASSISTANT:"
  assert ours.format_prompt("Hi", 0) == f"{system} USER: Hi ASSISTANT:"
  # Tags the user placed stay where they are.
  assert ours.format_prompt("A <image> B", 1) == f"{system} USER: A <image> B ASSISTANT:"
  # Every training template is available as a fallback, and generation prompts match training.
  assert Processor(ours.tokenizer, ours.image_processor, LAYOUT, fallback_template="llama_2").format_prompt(
      "Hi", 0).startswith("[INST]")
  with pytest.raises(LlavaJaxError, match="'nope'"):
    Processor(ours.tokenizer, ours.image_processor, LAYOUT, fallback_template="nope").format_prompt("Hi", 0)


def test_user_tags_kept_with_chat_template(ours):
  assert ours.format_prompt("A <image> B", 1) == "USER: A <image> B ASSISTANT:"


def test_raw_prompt_and_image_paths(ours, reference, tmp_path):
  path = tmp_path / "photo.png"
  _images((31, 47))[0].save(path)
  raw = "<s>USER: <image>\nWhat? ASSISTANT:"
  got = ours.prepare(raw, [path], raw=True)
  # --raw means the tokenizer's defaults, as LlavaProcessor(text=...), even with a BOS in the text.
  expected = reference(text=raw, images=[Image.open(path)], return_tensors="np")
  np.testing.assert_array_equal(got.input_ids, expected["input_ids"][0])
  np.testing.assert_array_equal(got.pixel_values, _nhwc(expected["pixel_values"]))


def test_image_count_mismatch(ours):
  with pytest.raises(LlavaJaxError, match=r"prompt has 2 <image> tag\(s\) but 1 image\(s\)"):
    ours.encode("<image> <image>", _images((28, 28)))
  with pytest.raises(LlavaJaxError, match=r"prompt has 0 <image> tag\(s\) but 1 image\(s\)"):
    ours.prepare("no tags", _images((28, 28)), raw=True)
  with pytest.raises(LlavaJaxError, match=r"prompt has 1 <image> tag\(s\) but 0 image\(s\)"):
    ours.prepare("one <image> here", [])


def test_chat_template_sources(tmp_path):
  folder = _model_folder(tmp_path, "JINJA")
  assert processor_lib.load_chat_template(folder) == "JINJA"
  (folder / "chat_template.json").write_text(json.dumps({"chat_template": "JSON"}))
  assert processor_lib.load_chat_template(folder) == "JSON"  # legacy file wins, as in transformers
  plain = tmp_path / "plain"
  tokenizer = build_tiny_tokenizer(plain)
  assert processor_lib.load_chat_template(plain, tokenizer) is None
  tokenizer.chat_template = "TOKENIZER"
  assert processor_lib.load_chat_template(plain, tokenizer) == "TOKENIZER"


def test_plain_tokenizer_loads_as_autotokenizer_without_torch(folder):
  auto = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
  ours = processor_lib.load_tokenizer(folder)
  assert type(ours) is type(auto)
  text = "USER: <image>\nWhat is in the image? ASSISTANT: a red square</s>"
  assert ours(text)["input_ids"] == auto(text)["input_ids"]
  # A fresh interpreter: AutoTokenizer would import torch (via the model-config classes).
  code = "import sys; from llava_jax.data import processor; processor.load_tokenizer(sys.argv[1]); print('torch' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_bad_folders(tmp_path):
  with pytest.raises(LlavaJaxError, match="nowhere: model folder not found"):
    Processor.from_folder(tmp_path / "nowhere", LAYOUT)
  with pytest.raises(LlavaJaxError, match="cannot load tokenizer"):
    Processor.from_folder(tmp_path, LAYOUT)


def test_decode(ours):
  ids = ours.tokenizer("What is in the image?")["input_ids"] + [ours.tokenizer.eos_token_id]
  assert ours.decode(np.asarray(ids)) == "What is in the image?"
