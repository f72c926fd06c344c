"""Generation on a device mesh (the 8 fake CPU devices): weights split by the logical-axis rules,
tokens identical to the one-device engine and to transformers, and the --mesh flag end to end.

Seeds are picked so greedy decoding varies its tokens (some tiny random models repeat one id).
"""

import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from jax.sharding import PartitionSpec as P

from hf_fixtures import hf_state, our_config, tiny_hf_model
from test_generate import NEW_TOKENS, PAD, _hf_generate, _hf_prefill_logits, _prompts
from tokenizer_fixture import build_tiny_tokenizer
from llava_jax import cli, sharding
from llava_jax.data.images import ImageProcessor
from llava_jax.errors import LlavaJaxError
from llava_jax.infer import run
from llava_jax.infer.generate import Engine
from llava_jax.weights.mapping import hf_to_params

MODELS = {  # name: (tiny_hf_model kwargs, mesh)
    "llama_mha": (dict(seed=2), {"data": 1, "fsdp": 2, "tensor": 4}),
    "mistral_gqa": (dict(seed=1, text="mistral"), {"data": 2, "fsdp": 2, "tensor": 2}),  # 2 kv heads
}


def _build(name):
  kwargs, mesh = MODELS[name]
  hf_model = tiny_hf_model(**kwargs)
  hf_model.generation_config.eos_token_id = None  # random weights: make sure all tokens are produced
  config = our_config(hf_model)
  params = hf_to_params(hf_state(hf_model).__getitem__, config)
  sharded = Engine(config, params, eos_token_ids=[], pad_token_id=PAD, mesh=sharding.make_mesh(mesh))
  return hf_model, config, params, sharded, _prompts(config.image_seq_length)


@pytest.fixture(scope="module")
def llama():
  return _build("llama_mha")


def test_params_are_split_over_the_mesh(llama):
  _, _, _, engine, _ = llama
  lm = engine.params["language_model"]
  # Decode layout: kernels output axes first, so (mlp, embed) -> (tensor, fsdp).
  for array, spec in [(lm["layers_0"]["mlp"]["up_proj"]["kernel"], P("tensor", "fsdp")),
                      (lm["layers_1"]["self_attn"]["q_proj"]["kernel"], P("tensor", None, "fsdp")),
                      (lm["layers_1"]["self_attn"]["o_proj"]["kernel"], P("fsdp", "tensor", None)),
                      (lm["embed_tokens"]["embedding"], P("tensor", "fsdp"))]:
    assert array.sharding.spec == spec
    assert {s.data.nbytes for s in array.addressable_shards} == {array.nbytes // 8}
  # Every device holds well under a third of the model (only small vectors and the patch conv are whole).
  total = sum(x.nbytes for x in jax.tree.leaves(engine.params))
  held = {}
  for x in jax.tree.leaves(engine.params):
    for s in x.addressable_shards:
      held[s.device] = held.get(s.device, 0) + s.data.nbytes
  assert len(held) == 8 and max(held.values()) < total / 3, (max(held.values()), total)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_batch_on_mesh_matches_one_device_and_transformers(name, llama):
  hf_model, config, params, sharded, prompts = llama if name == "llama_mha" else _build(name)
  single = Engine(config, params, eos_token_ids=[], pad_token_id=PAD)
  reference = _hf_generate(hf_model, prompts)  # left-padded batch
  ours, alone = sharded.generate(prompts, NEW_TOKENS), single.generate(prompts, NEW_TOKENS)
  for row, (completion, one_device) in enumerate(zip(ours, alone)):
    assert len(set(reference[row])) > 3  # the comparison means something
    np.testing.assert_array_equal(completion.tokens, reference[row], err_msg=f"row {row} vs transformers")
    np.testing.assert_array_equal(completion.tokens, one_device.tokens, err_msg=f"row {row} vs one device")


def test_prefill_logits_on_mesh_match_transformers(llama):
  hf_model, _, _, engine, prompts = llama
  logits, mask = engine.forward(prompts)
  ref = _hf_prefill_logits(hf_model, prompts, mask)
  valid = mask.astype(bool)
  assert np.abs(logits[valid] - ref[valid]).max() / np.abs(ref[valid]).max() < 1e-5


def test_stream_on_mesh_matches_transformers(llama):
  """A single prompt (its cache split over the kv heads) streamed in chunks on the mesh."""
  hf_model, _, _, engine, prompts = llama
  for prompt in prompts:
    chunks = list(engine.stream([prompt], NEW_TOKENS))
    assert len(chunks) > 2 and len(chunks[0][0]) == 1  # the first token alone, right after prefill
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), _hf_generate(hf_model, [prompt])[0])


def test_model_that_does_not_divide_the_mesh_names_the_parameter(llama):
  _, config, params, _, _ = llama
  with pytest.raises(LlavaJaxError, match="self_attn.*does not divide mesh axes tensor of size 8"):
    Engine(config, params, mesh=sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8}))  # 4 heads


def test_parse_mesh():
  assert sharding.parse_mesh("fsdp=2,tensor=4") == {"data": 1, "fsdp": 2, "tensor": 4}
  assert sharding.parse_mesh(" data=-1 , tensor=2") == {"data": -1, "fsdp": 1, "tensor": 2}
  for bad, message in [("tensor=x", "must be an integer"), ("model=2", "got 'model=2'"), ("tensor", "got 'tensor'"),
                       ("tensor=2,tensor=4", "each AXIS once"), ("", "got ''")]:
    with pytest.raises(LlavaJaxError, match=message):
      sharding.parse_mesh(bad)


@pytest.mark.parametrize("value,message", [
    ("tensor=two", "--mesh 'tensor=two': the size of tensor must be an integer, got 'two'"),
    ("tensor=3", "--mesh 'tensor=3': mesh {'data': 1, 'fsdp': 1, 'tensor': 3} needs 3 devices, 8 are available"),
], ids=["not_a_number", "device_count"])
def test_bad_mesh_flag_exits_2(tmp_path, value, message):
  # Checked before the model is loaded: the folder does not need to exist.
  result = subprocess.run([sys.executable, "-m", "llava_jax", "generate", "--model", str(tmp_path), "--prompt", "hi",
                           "--mesh", value], capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip().splitlines() == [f"llava-jax: error: {message}"]


def test_generate_command_with_mesh(tmp_path, monkeypatch, capsys):
  """`llava-jax generate --mesh fsdp=2,tensor=4` loads the folder onto the mesh and prints what one device does."""
  model = tiny_hf_model(seed=2)
  model.save_pretrained(tmp_path)
  build_tiny_tokenizer(tmp_path)
  ImageProcessor.default(28).save(tmp_path)
  image = tmp_path / "img.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(image)
  engines = []
  load = run.load_session

  def recording(*args):
    session = load(*args)
    engines.append(session.engine)
    return session
  monkeypatch.setattr(run, "load_session", recording)
  args = ["generate", "--model", str(tmp_path), "--image", str(image), "--raw", "--prompt", "USER: <image>\nhi ASSISTANT:",
          "--max-new-tokens", "8"]
  texts = []
  for extra in ([], ["--mesh", "fsdp=2,tensor=4"]):
    cli.main(args + extra)
    texts.append(capsys.readouterr().out)
  assert engines[0].mesh is None and dict(engines[1].mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
  assert texts[1] == texts[0] and texts[0].strip()
