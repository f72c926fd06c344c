"""hf-to-jax then jax-to-hf gives back every tensor bit for bit; transformers loads the result; the
original LLaVA release format imports to the model it describes."""

import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from hf_fixtures import tiny_hf_config, tiny_hf_model
from llava_jax.weights import convert, hf, mapping, model_folder

SHARD = 60_000  # bytes: the tiny model (~340 kB in float32) splits into several shards


def _read_folder(folder):
  """{name: array} of every tensor in an HF folder, plus the file order of the names."""
  out = {}
  for file in sorted(os.listdir(folder)):
    if file.endswith(".safetensors"):
      with safe_open(os.path.join(folder, file), "numpy") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def _assert_same_tensors(a, b):
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    assert a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), name


def _relayout(src, dst, layout):
  """Copies an HF folder, renaming its tensors into another of the three key layouts."""
  shutil.copytree(src, dst)
  for file in os.listdir(dst):
    path = os.path.join(dst, file)
    if file.endswith(".safetensors"):
      with safe_open(path, "numpy") as f:
        tensors = {mapping.to_layout(k, layout): f.get_tensor(k) for k in f.keys()}
      save_file(tensors, path, metadata={"format": "pt"})
    elif file == hf.SAFE_INDEX:
      with open(path) as f:
        index = json.load(f)
      index["weight_map"] = {mapping.to_layout(k, layout): v for k, v in index["weight_map"].items()}
      with open(path, "w") as f:
        json.dump(index, f)


def _inputs(config, seed=0):
  rng = np.random.default_rng(seed)
  n = config.image_seq_length
  ids = np.concatenate([[1, 5, 9], np.full(n, config.image_token_index), [7, 3, 11, 4]])[None]
  v = config.vision_config
  pixels = rng.standard_normal((1, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
  return torch.tensor(ids), torch.tensor(pixels)


def _logits(model, config):
  ids, pixels = _inputs(config)
  with torch.no_grad():
    return model(input_ids=ids, pixel_values=pixels.to(model.dtype)).logits


def _load_hf(folder):
  model, info = transformers.LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  return model.eval()


@pytest.fixture(scope="module")
def f32_model():
  return tiny_hf_model(seed=0)


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory, f32_model):
  """The tiny float32 model as transformers writes it: one file, and sharded."""
  root = tmp_path_factory.mktemp("hf")
  f32_model.save_pretrained(root / "single")
  f32_model.save_pretrained(root / "sharded", max_shard_size=SHARD)
  for folder in ("single", "sharded"):  # assets that must travel along
    (root / folder / "chat_template.jinja").write_text("{{ messages }}")
    (root / folder / "preprocessor_config.json").write_text('{"crop_size": 28}')
  return root


def round_trip(saved, tmp_path, layout: str, sharded: bool):
  """saved/single or saved/sharded, renamed into `layout`, through hf-to-jax and jax-to-hf: every tensor comes
  back bit for bit. Returns the source folder and the output folder."""
  src = saved / ("sharded" if sharded else "single")
  if layout != "saved":
    _relayout(src, tmp_path / "in", layout)
    src = tmp_path / "in"
  convert.hf_to_jax(str(src), str(tmp_path / "jax"))
  convert.jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "out"), max_shard_bytes=SHARD if sharded else 10**9)
  _assert_same_tensors(_read_folder(src), _read_folder(tmp_path / "out"))
  return src, tmp_path / "out"


@pytest.mark.parametrize("layout", mapping.LAYOUTS)
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_round_trip_bit_for_bit(tmp_path, saved_dirs, f32_model, layout, sharded):
  src, _ = round_trip(saved_dirs, tmp_path, layout, sharded)
  for asset in ("chat_template.jinja", "preprocessor_config.json", "generation_config.json", "config.json"):
    assert (tmp_path / "out" / asset).read_bytes() == (src / asset).read_bytes(), asset
  if layout == "saved":  # the very files transformers wrote, byte for byte (order, shards, index)
    assert sorted(os.listdir(src)) == sorted(os.listdir(tmp_path / "out"))
    for file in os.listdir(src):
      assert (tmp_path / "out" / file).read_bytes() == (src / file).read_bytes(), file
  config = f32_model.config
  assert torch.equal(_logits(_load_hf(tmp_path / "out"), config), _logits(f32_model, config))


FAMILIES = {"qwen2": dict(text="qwen2"), "qwen2_tied": dict(text="qwen2", tie=True),
            "llama3_128k_vocab": dict(text="llama3"), "siglip_pooling_head": dict(vision="siglip", strategy="full"),
            "siglip_no_head": dict(vision="siglip", head=False, feature_layer=-1, strategy="full")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_model_families(tmp_path, family):
  """hf-to-jax -> jax-to-hf bit for bit (sharded), and a folder whose config.json we write from the parsed
  config loads in transformers with no missing or unexpected keys and computes the same logits."""
  model = tiny_hf_model(seed=2, **FAMILIES[family])
  model.save_pretrained(tmp_path / "hf", max_shard_size=SHARD)
  convert.hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "jax"))
  convert.jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "out"), max_shard_bytes=SHARD)
  _assert_same_tensors(_read_folder(tmp_path / "hf"), _read_folder(tmp_path / "out"))
  assert (tmp_path / "out" / "config.json").read_bytes() == (tmp_path / "hf" / "config.json").read_bytes()

  loaded = model_folder.load_model(str(tmp_path / "jax"))
  model_folder.save_checkpoint_folder(str(tmp_path / "export"), loaded.config, loaded.params)
  convert.jax_to_hf(str(tmp_path / "export"), str(tmp_path / "export_hf"))
  _assert_same_tensors(_read_folder(tmp_path / "hf"), _read_folder(tmp_path / "export_hf"))
  written = json.loads((tmp_path / "export_hf" / "config.json").read_text())
  assert written["text_config"] == json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]
  config = model.config
  assert torch.equal(_logits(_load_hf(tmp_path / "export_hf"), config), _logits(model, config))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_round_trip_half_precision(tmp_path, dtype):
  model = tiny_hf_model(seed=1, text="mistral").to(dtype)
  model.save_pretrained(tmp_path / "hf", max_shard_size=SHARD // 2)
  convert.hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "jax"))
  loaded = model_folder.load_model(str(tmp_path / "jax"))
  want = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
  leaves = [np.asarray(x) for x in _leaves(loaded.params)]
  assert {str(x.dtype) for x in leaves} == {want}  # stored dtype kept, no float32 doubling
  convert.jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "out"), max_shard_bytes=SHARD // 2)
  _assert_same_tensors(_read_folder(tmp_path / "hf"), _read_folder(tmp_path / "out"))
  back = _load_hf(tmp_path / "out")
  assert back.dtype == dtype
  # Compared with the source folder loaded the same way (`.to(dtype)` also casts rotary buffers).
  assert torch.equal(_logits(back, model.config), _logits(_load_hf(tmp_path / "hf"), model.config))


def _leaves(tree):
  for value in tree.values():
    yield from (_leaves(value) if isinstance(value, dict) else [value])


def test_dtype_flag_and_bin_input(tmp_path, f32_model):
  # A weights-only pickled state dict in bfloat16 reads like safetensors does.
  state = {k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in _read_folder_from_model(f32_model).items()}
  (tmp_path / "bin").mkdir()
  torch.save(state, tmp_path / "bin" / hf.BIN_WEIGHTS)
  f32_model.config.save_pretrained(tmp_path / "bin")
  convert.hf_to_jax(str(tmp_path / "bin"), str(tmp_path / "jax"))
  convert.jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "bf16"))
  out = _read_folder(tmp_path / "bf16")
  assert sorted(out) == sorted(state)
  for name, tensor in state.items():
    assert out[name].tobytes() == tensor.view(torch.int16).numpy().tobytes(), name
  convert.jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "f16"), dtype="float16")
  f16 = _read_folder(tmp_path / "f16")
  assert {str(v.dtype) for v in f16.values()} == {"float16"}
  np.testing.assert_array_equal(f16["multi_modal_projector.linear_1.weight"],
                                out["multi_modal_projector.linear_1.weight"].astype(np.float16))
  assert json.loads((tmp_path / "f16" / "config.json").read_text())["dtype"] == "float16"
  _load_hf(tmp_path / "f16")


def _read_folder_from_model(model):
  from hf_fixtures import hf_state
  return hf_state(model)


def test_workdir_and_saved_folder_load(tmp_path, saved_dirs, f32_model):
  """A training workdir (Orbax CheckpointManager, item "params") and save_checkpoint_folder both
  load and export; the latest step wins."""
  loaded = model_folder.load_model(str(saved_dirs / "single"))
  assert loaded.source_format == "hf" and loaded.assets_dir == str(saved_dirs / "single")
  params = loaded.params
  doubled = {k: v for k, v in params.items()}
  doubled["projector"] = {name: {p: np.asarray(a) * 2 for p, a in layer.items()}
                          for name, layer in params["projector"].items()}
  workdir = tmp_path / "work"
  shutil.copytree(saved_dirs / "single", workdir / "model", ignore=shutil.ignore_patterns("*.safetensors"))
  manager = ocp.CheckpointManager(str(workdir / "checkpoints"), item_names=("params",))
  manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
  manager.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave(doubled)))
  manager.wait_until_finished()
  manager.close()

  from_workdir = model_folder.load_model(str(workdir))
  assert from_workdir.source_format == "workdir" and from_workdir.assets_dir == str(workdir / "model")
  np.testing.assert_array_equal(np.asarray(from_workdir.params["projector"]["linear_1"]["kernel"]),
                                np.asarray(doubled["projector"]["linear_1"]["kernel"]))
  convert.jax_to_hf(str(workdir), str(tmp_path / "out"))
  out = _read_folder(tmp_path / "out")
  src = _read_folder(saved_dirs / "single")
  np.testing.assert_array_equal(out["multi_modal_projector.linear_2.bias"], src["multi_modal_projector.linear_2.bias"] * 2)
  np.testing.assert_array_equal(out["vision_tower.pre_layrnorm.weight"], src["vision_tower.pre_layrnorm.weight"])
  _load_hf(tmp_path / "out")

  # The trainer/demo export: config written from LlavaConfig, assets copied.
  model_folder.save_checkpoint_folder(str(tmp_path / "export"), loaded.config, params, assets_dir=loaded.assets_dir)
  assert (tmp_path / "export" / "chat_template.jinja").exists()
  convert.jax_to_hf(str(tmp_path / "export"), str(tmp_path / "export_hf"))
  _assert_same_tensors(src, _read_folder(tmp_path / "export_hf"))
  config = f32_model.config
  assert torch.equal(_logits(_load_hf(tmp_path / "export_hf"), config), _logits(f32_model, config))


# ---- the original haotian-liu release format -------------------------------------------------

ORIG_VOCAB = 120  # +2 tokens, padded to 64 -> the 128 rows of the tiny HF model


def _original_release(root, reference, kind):
  """Hand-builds an original LLaVA folder and a CLIP folder holding `reference`'s weights."""
  state = _read_folder_from_model(reference)
  cfg = reference.config
  text = cfg.text_config
  orig, clip = root / "orig", root / "clip"
  orig.mkdir()
  clip.mkdir()
  tensors = {}
  for name, value in state.items():
    if name.startswith("language_model.model."):
      tensors[name[len("language_model."):]] = value
    elif name == "language_model.lm_head.weight":
      tensors["lm_head.weight"] = value
  for name in ("model.embed_tokens.weight", "lm_head.weight"):
    tensors[name] = np.ascontiguousarray(tensors[name][:ORIG_VOCAB])
  if kind == "mlp2x_gelu":
    for i, linear in (("0", "linear_1"), ("2", "linear_2")):
      for p in ("weight", "bias"):
        tensors[f"model.mm_projector.{i}.{p}"] = state[f"multi_modal_projector.{linear}.{p}"]
  else:
    for p in ("weight", "bias"):
      tensors[f"model.mm_projector.{p}"] = state[f"multi_modal_projector.linear_1.{p}"]
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(6, np.float32)  # old exports carry it
  save_file(tensors, str(orig / "model.safetensors"))
  (orig / "config.json").write_text(json.dumps({
      "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "vocab_size": ORIG_VOCAB,
      "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
      "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
      "num_key_value_heads": text.num_key_value_heads, "rms_norm_eps": text.rms_norm_eps,
      "max_position_embeddings": text.max_position_embeddings, "rope_theta": 10000.0, "hidden_act": "silu",
      "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
      "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": cfg.vision_config.hidden_size,
      "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_projector_type": kind,
      "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False}))
  save_file({"vision_model." + k[len("vision_tower."):]: v for k, v in state.items() if k.startswith("vision_tower.")},
            str(clip / "model.safetensors"))
  vision = cfg.vision_config.to_dict()
  vision["model_type"] = "clip_vision_model"
  (clip / "config.json").write_text(json.dumps(vision))
  return orig, clip


def _reference(kind):
  config = tiny_hf_config(projector_act="gelu" if kind == "mlp2x_gelu" else "linear")
  config.image_token_index = ORIG_VOCAB
  config.text_config.pad_token_id = ORIG_VOCAB + 1
  torch.manual_seed(3)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
    if kind == "linear":  # what the converter must produce from W, b alone
      model.model.multi_modal_projector.linear_2.weight.copy_(torch.eye(config.text_config.hidden_size))
      model.model.multi_modal_projector.linear_2.bias.zero_()
  return model


@pytest.mark.parametrize("kind", ["mlp2x_gelu", "linear"])
def test_llava_to_hf(tmp_path, kind):
  reference = _reference(kind)
  orig, clip = _original_release(tmp_path, reference, kind)
  # A tokenizer without <image>: the converter adds <image> (id 120) and <pad> (121).
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(ORIG_VOCAB - 3)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>").save_pretrained(orig)

  convert.llava_to_hf(str(orig), str(tmp_path / "out"), vision_tower=str(clip))
  out = _load_hf(tmp_path / "out")
  assert out.config.image_token_index == ORIG_VOCAB and out.config.text_config.vocab_size == 128
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  assert tokenizer.convert_tokens_to_ids("<image>") == ORIG_VOCAB and tokenizer.pad_token_id == ORIG_VOCAB + 1
  pre = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
  assert pre["image_aspect_ratio"] == "pad"

  # The hand-assembled reference: new vocabulary rows are the mean of the original rows (to float32
  # rounding: the summation order differs), then the converter's exact rows for the bitwise checks.
  with torch.no_grad():
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
      matrix, converted = reference.state_dict()[name], out.state_dict()[name]
      torch.testing.assert_close(converted[ORIG_VOCAB:], matrix[:ORIG_VOCAB].mean(0).expand(8, -1), rtol=1e-5, atol=1e-7)
      matrix[ORIG_VOCAB:] = converted[ORIG_VOCAB:]
  for name, value in reference.state_dict().items():
    assert torch.equal(out.state_dict()[name], value), name
  assert torch.equal(_logits(out, reference.config), _logits(reference, reference.config))
  if kind == "linear":  # transformers computes exactly W x + b on the selected CLIP features
    _, pixels = _inputs(reference.config)
    with torch.no_grad():
      hidden = out.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
      w = torch.from_numpy(_read_folder(orig)["model.mm_projector.weight"])
      b = torch.from_numpy(_read_folder(orig)["model.mm_projector.bias"])
      features = out.model.get_image_features(pixel_values=pixels)
      features = features.pooler_output if hasattr(features, "pooler_output") else features
      features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    torch.testing.assert_close(features.reshape(hidden.shape[:2] + (-1,)), hidden @ w.T + b, rtol=1e-6, atol=1e-6)
