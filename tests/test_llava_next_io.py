"""LLaVA-NeXT folders through conversion (both ways, bit for bit), `llava-jax generate` (bad input exits 2) and
`serve` (two images of different sizes in one request equal its generate run; bad images get a 4xx JSON)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from hf_fixtures import next_image_processor, tiny_hf_next_model
from llava_jax.infer import run
from llava_jax.infer.generate import Prompt
from llava_jax.infer.sampling import SamplingParams
from llava_jax.infer.serve.command import load_service
from llava_jax.weights import convert, mapping
from test_convert import SHARD, _assert_same_tensors, _read_folder, round_trip
from test_generate_cli import assert_generate_exits_2
from test_llava_next import TEMPLATE, reference_processor
from test_server import MODEL_ID, _data_url, client  # noqa: F401  (client: the HTTP fixture over `service`)
from tokenizer_fixture import build_tiny_tokenizer

MAX_TOKENS = 6
SIZES = [(40, 40), (30, 80)]


def _png(size, seed=0) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()


@pytest.fixture(scope="module")
def next_model():
  return tiny_hf_next_model(seed=3, text="mistral")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, next_model):
  root = tmp_path_factory.mktemp("next_hf")
  next_model.save_pretrained(root / "single")
  next_model.save_pretrained(root / "sharded", max_shard_size=SHARD)
  return root


@pytest.mark.parametrize("layout", mapping.LAYOUTS)
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_round_trip_bit_for_bit(tmp_path, saved, next_model, layout, sharded):
  src, out = round_trip(saved, tmp_path, layout, sharded)
  assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
  model, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert torch.equal(model.model.image_newline, next_model.model.image_newline)


def test_half_precision_round_trip(tmp_path, next_model):
  model = tiny_hf_next_model(seed=3, text="mistral").to(torch.bfloat16)
  model.save_pretrained(tmp_path / "src")
  convert.hf_to_jax(str(tmp_path / "src"), str(tmp_path / "jax"))
  convert.jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "out"))
  _assert_same_tensors(_read_folder(tmp_path / "src"), _read_folder(tmp_path / "out"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, next_model):
  """A complete NeXT folder: weights, tokenizer, processor files (LlavaNextProcessor's), chat template, images."""
  path = tmp_path_factory.mktemp("next_model")
  next_model.generation_config.eos_token_id = 2
  next_model.generation_config.pad_token_id = 0
  next_model.save_pretrained(path)
  reference_processor(build_tiny_tokenizer(path)).save_pretrained(path)
  for i, size in enumerate(SIZES):
    (path / f"img{i}.png").write_bytes(_png(size, i))
  (path / "tiny.png").write_bytes(_png((5, 40)))
  (path / "bad.png").write_bytes(b"this is not a png")
  return path


@pytest.mark.parametrize("args,message", [
    (["--image", "{folder}/tiny.png", "--prompt", "hi"], "tiny.png: image is 5x40 (height x width) pixels, smaller"),
    (["--image", "{folder}/bad.png", "--prompt", "hi"], "bad.png: not an image"),
    (["--image", "{folder}/img0.png", "--prompt", "<image> <image>", "--raw"], "has 2 <image> tag(s) but 1 image"),
])
def test_generate_bad_input_exits_2(folder, args, message):
  assert_generate_exits_2(folder, args, message)


@pytest.fixture(scope="module")
def service(folder):
  return load_service(str(folder), model_id=MODEL_ID, max_batch=4, batch_wait_ms=5)


def _body(images):
  content = [{"type": "image_url", "image_url": {"url": _data_url(png)}} for png in images]
  return {"model": MODEL_ID, "messages": [{"role": "user", "content": content + [{"type": "text", "text": "What?"}]}],
          "max_tokens": MAX_TOKENS, "temperature": 0}


def test_serve_two_images_of_different_sizes_equals_generate(client, service, folder):  # noqa: F811
  images = [Image.open(folder / f"img{i}.png") for i in range(len(SIZES))]
  inputs = service.session.processor.prepare("What?", images)
  expected = "".join(run.stream_text(service.session, Prompt.of(inputs), MAX_TOKENS, SamplingParams()))
  assert expected.strip()
  response = client.post("/v1/chat/completions", json=_body([(folder / f"img{i}.png").read_bytes()
                                                             for i in range(len(SIZES))]))
  assert response.status_code == 200, response.text
  answer = response.json()
  assert answer["choices"][0]["message"]["content"] == expected
  assert answer["usage"]["prompt_tokens"] == len(inputs.input_ids)


def test_serve_refuses_images_smaller_than_a_patch(client, folder):  # noqa: F811
  response = client.post("/v1/chat/completions", json=_body([(folder / "tiny.png").read_bytes()]))
  assert response.status_code == 400
  assert "smaller than one 7x7 patch" in response.json()["error"]["message"]
