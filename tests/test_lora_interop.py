"""LoRA adapters in and out (weights/adapters.py) against peft 0.21.2 on the tiny transformers LLaVA and LLaVA-NeXT:
our PEFT export loaded by `PeftModel.from_pretrained`, a PEFT adapter trained a step in PyTorch and LLaVA's release
layout of it imported into ours, `convert merge-lora` loaded by transformers, `generate --adapter` (on a mesh too),
`chat --adapter` and `serve --adapter` against transformers + peft greedy decoding, and bad adapters."""

import io
import json
import os

import numpy as np
import peft
import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from flax import traverse_util
from PIL import Image

from hf_fixtures import hf_state, our_config, tiny_hf_model, tiny_hf_next_model
from llava_jax import cli
from llava_jax.data.images import ImageProcessor
from llava_jax.infer.serve.app import create_app
from llava_jax.infer.serve.command import load_service
from llava_jax.models.lora import LoraConfig
from llava_jax.weights.mapping import hf_to_params
from llava_jax.weights.model_folder import save_checkpoint_folder
from test_generate_cli import TEMPLATE
from test_llava_next import reference_processor
from test_server import MODEL_ID as SERVED_MODEL_ID, _request as server_request
from test_lora import _lora_params, session_logits
from tokenizer_fixture import build_tiny_tokenizer

QUESTION = "What is in the image?"
MAX_NEW = 8
LM_TARGETS = "language_model/layers/.*"  # our regex: every linear layer of the decoder layers
PEFT_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"  # the same layers in transformers
FAMILIES = {"llava": (tiny_hf_model, transformers.LlavaForConditionalGeneration),
            "llava_next": (tiny_hf_next_model, transformers.LlavaNextForConditionalGeneration)}


def _llava_processor_files(path):
  ImageProcessor.default(28).save(path)
  (path / "processor_config.json").write_text(json.dumps({
      "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 7,
      "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}))
  (path / "chat_template.jinja").write_text(TEMPLATE)


class Family:
  """A complete tiny HF folder of one family, its transformers processor, one prompt and its inputs both ways."""

  def __init__(self, name, path):
    make, self.cls = FAMILIES[name]
    model = make(seed=3)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0  # all tokens produced
    model.save_pretrained(path)
    tokenizer = build_tiny_tokenizer(path)
    if name == "llava":
      _llava_processor_files(path)
    else:
      reference_processor(tokenizer).save_pretrained(path)
    self.name, self.path, self.config = name, path, our_config(model)
    self.base = hf_to_params(hf_state(model).__getitem__, self.config)
    self.image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    self.image.save(path / "img.png")
    self.processor = transformers.AutoProcessor.from_pretrained(str(path))
    text = self.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True)
    self.inputs = self.processor(images=[self.image], text=text, return_tensors="pt")

  def hf_model(self):
    return self.cls.from_pretrained(str(self.path)).eval()

  def hf_logits(self, model):
    with torch.no_grad():
      return model(**self.inputs).logits[0].numpy()

  def our_logits(self, model, adapter=None):
    return session_logits(model, [self.image], adapter, QUESTION)


def assert_close(got, want):
  assert got.shape == want.shape and np.abs(want).max() > 1.0
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), np.abs(got - want).max()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  return Family(request.param, tmp_path_factory.mktemp(request.param))


# ---- ours -> PEFT -------------------------------------------------------------------------------


def test_exported_adapter_gives_our_logits_in_peft(family, tmp_path):
  """A LoRA checkpoint (random nonzero adapters, a changed projector and image_newline, as after training) ->
  `convert jax-to-peft` -> PeftModel.from_pretrained on the transformers model; and back in with --adapter."""
  spec = LoraConfig(rank=4, alpha=8.0, targets=LM_TARGETS + "|projector/linear_1")  # exported merged in the projector
  params = traverse_util.flatten_dict(_lora_params(family.config, family.base, spec, b_scale=0.05), sep="/")
  rng = np.random.default_rng(1)
  for path in params:
    if path.startswith(("projector/", "image_newline")):
      params[path] = params[path] + 0.05 * rng.standard_normal(params[path].shape).astype(np.float32)
  checkpoint = save_checkpoint_folder(str(tmp_path / "lora"), family.config.replace(lora=spec),
                                      traverse_util.unflatten_dict(params, sep="/"), assets_dir=str(family.path))
  cli.main(["convert", "jax-to-peft", checkpoint, str(tmp_path / "peft"), "--base-model", "tiny"])
  ours = family.our_logits(checkpoint)  # --model LORA_CHECKPOINT: the spec saved with the config

  want = family.hf_logits(peft.PeftModel.from_pretrained(family.hf_model(), str(tmp_path / "peft")).eval())
  assert_close(ours, want)
  assert np.abs(want - family.hf_logits(family.hf_model())).max() > 1e-2  # adapters and projector matter
  assert_close(family.our_logits(family.path, adapter=tmp_path / "peft"), want)


# ---- PEFT and LLaVA's releases -> ours ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(family, tmp_path_factory):
  """A PEFT adapter (the LM's linear layers, the projector as modules_to_save) after one AdamW step in PyTorch,
  saved; and its logits. NeXT's uses rsLoRA (scale alpha/sqrt(r))."""
  torch.manual_seed(0)
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, modules_to_save=["multi_modal_projector"],
                           use_rslora=family.name == "llava_next")
  model = peft.get_peft_model(family.hf_model(), config)
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
  labels = family.inputs["input_ids"].clone()
  model(**family.inputs, labels=labels).loss.backward()
  optimizer.step()
  model.eval()
  folder = tmp_path_factory.mktemp("peft_adapter")
  model.save_pretrained(str(folder))
  b = [p for n, p in model.named_parameters() if "lora_B" in n]
  assert b and all(p.abs().max() > 0 for p in b)
  logits = family.hf_logits(model)
  assert np.abs(logits - family.hf_logits(family.hf_model())).max() > 1e-2  # the step changed the model
  return model, folder, logits


def test_peft_adapter_imports_with_peft_logits(family, trained):
  _, folder, want = trained
  assert_close(family.our_logits(family.path, adapter=folder), want)


def _llava_release(folder, out):
  """The adapter as LLaVA's LoRA releases hold it: its own model's names (`model.layers.N`, `model.mm_projector.0`)
  in adapter_model.bin, the projector in non_lora_trainables.bin, an older peft's adapter_config.json."""
  from safetensors.torch import load_file
  os.makedirs(out)
  lora, whole = {}, {}
  for key, value in load_file(os.path.join(folder, "adapter_model.safetensors")).items():
    key = key.replace("model.language_model.", "model.")
    if ".multi_modal_projector." in key:
      whole[key.replace("multi_modal_projector.linear_1", "mm_projector.0")
            .replace("multi_modal_projector.linear_2", "mm_projector.2")] = value
    else:
      lora[key] = value
  torch.save(lora, os.path.join(out, "adapter_model.bin"))
  torch.save(whole, os.path.join(out, "non_lora_trainables.bin"))
  with open(os.path.join(folder, "adapter_config.json")) as f:
    settings = json.load(f)
  settings.update(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  base_model_name_or_path="lmsys/vicuna-7b-v1.5", task_type="CAUSAL_LM", modules_to_save=None)
  settings.pop("auto_mapping", None)
  with open(os.path.join(out, "adapter_config.json"), "w") as f:
    json.dump(settings, f)
  assert any(k.startswith("base_model.model.model.layers.0.") for k in lora)
  assert sorted(whole)[0] == "base_model.model.model.mm_projector.0.bias"
  return out


def test_llava_release_lora_imports_with_peft_logits(family, trained, tmp_path):
  _, folder, want = trained
  release = _llava_release(folder, tmp_path / "llava-v1.5-lora")
  assert_close(family.our_logits(family.path, adapter=release), want)


def test_merge_lora_loads_in_transformers_with_the_unmerged_logits(family, trained, tmp_path):
  _, folder, want = trained
  cli.main(["convert", "merge-lora", str(family.path), str(folder), str(tmp_path / "merged")])
  merged = family.cls.from_pretrained(str(tmp_path / "merged")).eval()
  assert_close(family.hf_logits(merged), want)


@pytest.mark.parametrize("family", ["llava"], indirect=True)
def test_generate_chat_and_serve_with_adapter_equal_transformers_peft_greedy(family, trained, capsys, monkeypatch):
  model, folder, _ = trained
  with torch.no_grad():
    out = model.generate(**family.inputs, do_sample=False, max_new_tokens=MAX_NEW)
    base = family.hf_model().generate(**family.inputs, do_sample=False, max_new_tokens=MAX_NEW)
  width = family.inputs["input_ids"].shape[1]
  assert not torch.equal(out[0, width:], base[0, width:])  # the adapter changes the answer
  want = family.processor.decode(out[0, width:], skip_special_tokens=True)
  image, adapter = str(family.path / "img.png"), ["--model", str(family.path), "--adapter", str(folder)]
  for mesh in ([], ["--mesh", "data=2,fsdp=2,tensor=2"]):  # the adapters sharded with their kernels too
    cli.main(["generate", *adapter, *mesh, "--image", image, "--prompt", QUESTION, "--max-new-tokens", str(MAX_NEW)])
    assert capsys.readouterr().out == want + "\n"
  monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/quit\n"))
  cli.main(["chat", *adapter, "--image", image, "--max-new-tokens", str(MAX_NEW)])
  assert capsys.readouterr().out == want + "\n"
  service = load_service(str(family.path), model_id=SERVED_MODEL_ID, adapter=str(folder))
  with TestClient(create_app(service)) as client:
    body = server_request(QUESTION, (family.path / "img.png").read_bytes(), max_tokens=MAX_NEW)
    reply = client.post("/v1/chat/completions", json=body)
  assert reply.json()["choices"][0]["message"]["content"] == want


# ---- bad input --------------------------------------------------------------------------------------


def _edited(folder, out, settings=None, tensors=None):
  """A copy of the adapter folder with adapter_config.json keys and tensors changed (None: dropped)."""
  from safetensors.numpy import load_file, save_file
  os.makedirs(out)
  with open(os.path.join(folder, "adapter_config.json")) as f:
    config = dict(json.load(f), **(settings or {}))
  weights = dict(load_file(os.path.join(folder, "adapter_model.safetensors")), **(tensors or {}))
  save_file({k: v for k, v in weights.items() if v is not None}, os.path.join(out, "adapter_model.safetensors"))
  with open(os.path.join(out, "adapter_config.json"), "w") as f:
    json.dump(config, f)
  return out


Q_A = "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight"


def _bad_adapters(folder, root, names):
  from safetensors.numpy import load_file
  lora = [k for k in load_file(os.path.join(folder, "adapter_model.safetensors")) if ".lora_" in k]
  cases = {
      "architecture": ({"auto_mapping": {"base_model_class": "LlavaNextForConditionalGeneration"}}, None,
                       "the adapter is for a LlavaNextForConditionalGeneration, the base model is a "
                       "LlavaForConditionalGeneration"),
      "shape": (None, {Q_A: np.zeros((4, 40), np.float32)},
                f"tensor {Q_A} has shape (4, 40), expected (4, 48)"),
      "rank": ({"r": 3}, None, f"tensor {sorted(lora)[0]} has shape (4, "),
      "rank_zero": ({"r": 0}, None, "adapter_config.json: r must be an integer >= 1, got 0"),
      "no_targets": ({"target_modules": "nothing"}, dict.fromkeys(lora),
                     "target_modules 'nothing' adapt no linear layer of this llava model"),
      "unknown_layer": (None, {Q_A.replace("q_proj", "qkv_proj"): np.zeros((4, 48), np.float32)},
                        "names no linear layer of this llava model"),
      "dora": ({"use_dora": True}, None, "use_dora True is not supported"),
  }
  return {name: (str(_edited(folder, root / name, settings, tensors)), message)
          for name, (settings, tensors, message) in cases.items() if name in names}


BAD = ["architecture", "shape", "rank", "rank_zero", "no_targets", "unknown_layer", "dora"]


def _exits_2(argv, capsys, message):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("family", ["llava"], indirect=True)
def test_bad_adapters_exit_2_with_one_line_and_no_output(family, trained, tmp_path, capsys):
  _, folder, _ = trained
  for name, (adapter, message) in _bad_adapters(folder, tmp_path, BAD).items():
    out = tmp_path / f"{name}_merged"
    _exits_2(["convert", "merge-lora", str(family.path), adapter, str(out)], capsys, message)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(f".{name}_merged")]
  _exits_2(["generate", "--model", str(family.path), "--adapter", str(tmp_path / "nowhere"), "--prompt", "hi"],
           capsys, "nowhere: no such adapter folder")
  _exits_2(["convert", "jax-to-peft", str(family.path), str(tmp_path / "peft")], capsys,
           "not a LoRA model (its config.json has no llava_jax.lora section)")
  assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("family", ["llava"], indirect=True)
@pytest.mark.parametrize("lora,message", [
    ({"rank": 4, "alpha": 8.0, "targets": LM_TARGETS, "quantize": "int3"},
     "config.json: llava_jax.lora.quantize must be one of ('none', 'int8', 'nf4'), got 'int3'"),
    ({"rank": 0, "alpha": 8.0, "targets": LM_TARGETS}, "config.json: llava_jax.lora.rank must be >= 1, got 0"),
])
def test_bad_lora_section_of_a_checkpoint_exits_2(family, tmp_path, capsys, lora, message):
  folder = tmp_path / "model"
  folder.mkdir()
  with open(family.path / "config.json") as f:
    config = json.load(f)
  (folder / "config.json").write_text(json.dumps(dict(config, llava_jax={"lora": lora})))
  _exits_2(["convert", "jax-to-peft", str(folder), str(tmp_path / "out")], capsys, message)
  assert not (tmp_path / "out").exists()
