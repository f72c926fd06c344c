"""LoRA adapters and QLoRA's quantized base (models/lora.py, models/quantize.py) on tiny random models: exactness
of fresh adapters, the adapter math and the quantization error against hand computations, generation against the
merged weights W + s·A·B, and tiny `llava-jax train` runs of the LoRA stages (what trains, memorization,
SIGKILL + rerun, a QLoRA workdir run as a model against its merged export, bad input)."""

import glob
import importlib.util
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import train_fixtures as F
from hf_fixtures import hf_state, our_config, tiny_hf_model
from llava_jax import cli, sharding
from llava_jax.infer.generate import Engine, Prompt
from llava_jax.infer.run import load_images, load_session
from llava_jax.models import quantize
from llava_jax.models.llava import Llava, abstract_params, example_batch
from llava_jax.models.lora import LoraConfig, from_base
from llava_jax.train import build, main as train_main
from llava_jax.weights.mapping import hf_to_params
from test_generate import NEW_TOKENS, PAD, _prompts
from test_train_processes import assert_sigkill_then_rerun_equals_uninterrupted

LM_LINEAR = "language_model/layers/.*"
FAMILIES = {"llama_clip": {}, "qwen2_siglip": {"text": "qwen2", "vision": "siglip"}}


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _lora_params(config, base, spec, seed=0, b_scale=0.0):
  """The LoRA model's params from `base`, with B drawn at `b_scale` (0: fresh adapters)."""
  params = _flat(from_base(base, abstract_params(config.replace(lora=spec)), spec, jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  for path in params:
    if path.endswith("/lora_b"):
      params[path] = (b_scale * rng.standard_normal(params[path].shape)).astype(np.float32)
  return traverse_util.unflatten_dict(params, sep="/")


def _merged(params, spec):
  """A LoRA model's params as the plain model's: every adapted kernel W + (alpha/rank)·A·B, adapters dropped."""
  flat, out = _flat(params), {}
  for path, value in flat.items():
    if path.endswith(("/lora_a", "/lora_b")):
      continue
    module = path.rsplit("/", 1)[0]
    if path.endswith("/kernel") and f"{module}/lora_a" in flat:
      a, b = np.asarray(flat[f"{module}/lora_a"], np.float64), np.asarray(flat[f"{module}/lora_b"], np.float64)
      if "/layers/" in module:  # stacked on the scanned `layers` axis
        delta = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
      else:
        delta = np.tensordot(a, b, axes=1)
      value = (np.asarray(value, np.float64) + spec.scale * delta).astype(np.float32)
    out[path] = value
  return traverse_util.unflatten_dict(out, sep="/")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
  hf_model = tiny_hf_model(**FAMILIES[request.param])
  config = our_config(hf_model)
  return config, hf_to_params(hf_state(hf_model).__getitem__, config)


def _ids(config):
  return _prompts(config.image_seq_length)[1]


def _logits(config, params, prompt):
  return np.asarray(Llava(config).apply({"params": params}, prompt.input_ids[None], prompt.pixel_values[None])[0])


@pytest.mark.parametrize("targets", [LM_LINEAR, ".*"])  # the recipe's layers; every linear layer of all towers
def test_fresh_adapters_leave_logits_exactly_unchanged(family, targets):
  config, base = family
  spec = LoraConfig(rank=4, alpha=8.0, targets=targets)
  params = _lora_params(config, base, spec)
  adapted = [p for p in _flat(params) if p.endswith("/lora_a")]
  linear = [p for p in _flat(base) if p.endswith("/kernel") and "patch_embedding" not in p]  # not the conv
  assert len(adapted) == (7 if targets == LM_LINEAR else len(linear))
  prompt = _ids(config)
  np.testing.assert_array_equal(_logits(config.replace(lora=spec), params, prompt), _logits(config, base, prompt))


def test_lora_a_is_initialized_as_peft_does(family):
  config, base = family
  spec = LoraConfig(rank=4, alpha=8.0, targets=LM_LINEAR)
  a = np.asarray(_flat(_lora_params(config, base, spec))["language_model/layers/mlp/down_proj/lora_a"])
  bound = 1 / np.sqrt(config.text.intermediate_size)  # kaiming_uniform_(a=sqrt(5)): 1/sqrt(fan_in)
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound and abs(a.mean()) < 0.1 * bound


def test_lora_dense_equals_hand_computation():
  """One adapted layer with two contracted axes (o_proj's heads x head_dim) against numpy, both layouts."""
  from llava_jax.models.layers import dense
  spec = LoraConfig(rank=3, alpha=6.0, targets=".*")  # a top-level layer's path is empty
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 4, 6)).astype(np.float32)
  for out_first in (False, True):
    layer = dense(8, ("heads", "kv", "embed"), name="o_proj", dtype=jnp.float32, use_bias=True, contract=(-2, -1),
                  out_first=out_first, lora=spec)
    params = nn.unbox(layer.init(jax.random.key(1), x)["params"])
    params = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    w = params["kernel"] if not out_first else np.moveaxis(params["kernel"], 0, -1)
    want = (np.einsum("bshd,hdo->bso", x, w) + params["bias"]
            + 2.0 * np.einsum("bshd,hdr,ro->bso", x, params["lora_a"], params["lora_b"]))
    np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_dequantized_weights_are_within_the_format_bound(mode):
  rng = np.random.default_rng(0)
  group = 16
  w = (rng.standard_normal((3, 64, 24)) * rng.uniform(0.01, 1, (3, 1, 24))).astype(np.float32)
  w[0, :group, 0] = 0  # an all-zero group
  codes, scales = quantize.quantize(jnp.asarray(w), mode, group)
  assert codes.dtype == (np.int8 if mode == "int8" else np.uint8)
  assert codes.shape == (3, 64 if mode == "int8" else 32, 24) and scales.shape == (3, 4, 24)
  err = np.abs(np.asarray(quantize.dequantize(codes, scales, mode, group)) - w).reshape(3, 4, group, 24)
  absmax = np.abs(w).reshape(3, 4, group, 24).max(axis=2, keepdims=True)
  if mode == "int8":  # round to the nearest step absmax/127: at most half a step off
    bound = absmax / 127 / 2
  else:  # the nearest NF4 level to w/absmax: at most half the widest gap between neighbouring levels
    levels = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0]
    bound = absmax * np.max(np.diff(levels)) / 2
  assert np.all(err <= bound * (1 + 1e-6) + 1e-12)
  assert np.all(err[0, 0, :, 0] == 0)
  assert err.max() > 0.25 * bound.max()  # the bound is not vacuous


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_qlora_forward_equals_the_float_forward_of_dequantized_weights(family, mode):
  config, base = family
  qspec = LoraConfig(rank=4, alpha=8.0, targets=LM_LINEAR, quantize=mode, group_size=16)
  qparams = _lora_params(config, base, qspec, b_scale=0.05)
  flat = _flat(qparams)
  floats = {}
  for path, value in flat.items():
    module, leaf = path.rsplit("/", 1)
    if leaf == "kernel_scale":
      continue
    if leaf == "kernel_q":
      shape = _flat(base)[f"{module}/kernel"].shape
      n = int(np.prod(flat[f"{module}/kernel_scale"].shape[2:]))
      w = quantize.dequantize(value.reshape(shape[0], -1, n), flat[f"{module}/kernel_scale"].reshape(shape[0], -1, n),
                              mode, 16)
      path, value = f"{module}/kernel", np.asarray(w).reshape(shape)
    floats[path] = value
  fspec = LoraConfig(rank=4, alpha=8.0, targets=LM_LINEAR)
  prompt = _ids(config)
  want = _logits(config.replace(lora=fspec), traverse_util.unflatten_dict(floats, sep="/"), prompt)
  got = _logits(config.replace(lora=qspec), qparams, prompt)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(got - _logits(config, base, prompt)).max() > 1e-3  # quantization did change the model


@pytest.mark.parametrize("layout", ["cpu", "scanned"])
def test_engine_generates_as_the_merged_weights(family, layout):
  config, base = family
  spec = LoraConfig(rank=4, alpha=8.0, targets=".*")
  params = _lora_params(config, base, spec, b_scale=0.05)
  prompts = _prompts(config.image_seq_length)
  merged = Engine(config, _merged(params, spec), eos_token_ids=[], pad_token_id=PAD, layout=layout)
  lora = Engine(config.replace(lora=spec), params, eos_token_ids=[], pad_token_id=PAD, layout=layout)
  want, got = merged.generate(prompts, NEW_TOKENS), lora.generate(prompts, NEW_TOKENS)
  plain = Engine(config, base, eos_token_ids=[], pad_token_id=PAD, layout=layout).generate(prompts, NEW_TOKENS)
  assert any(not np.array_equal(w.tokens, p.tokens) for w, p in zip(want, plain))  # the adapters matter
  for row, (w, g) in enumerate(zip(want, got)):
    np.testing.assert_array_equal(g.tokens, w.tokens, err_msg=f"row {row}")


# ---- training: the recipes' stages on the tiny model ----

LORA_OVERRIDES = {"lora.rank": 8, "lora.alpha": 16.0, "data.template": "plain", "warmup_ratio": 0.0, "batch_size": 8,
                  "mesh.data": -1}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return F.make_world(tmp_path_factory.mktemp("lora_world"))


def _checkpoint(workdir, step):
  from llava_jax.weights.model_folder import restore_params
  return _flat(restore_params(str(workdir / "checkpoints" / str(step) / "params")))


def _opt_leaves(workdir, step):
  from llava_jax.weights.model_folder import restore_params
  return restore_params(str(workdir / "checkpoints" / str(step) / "opt_state"))


@pytest.mark.parametrize("stage", ["finetune_lora", "finetune_qlora"])
def test_only_adapters_and_projector_train(world, tmp_path, stage):
  workdir = tmp_path / "run"
  train_main.run(F.train_args(world, workdir, stage=stage, total_steps=3, checkpoint_every=1, **LORA_OVERRIDES))
  before, after = _checkpoint(workdir, 1), _checkpoint(workdir, 3)
  trains = lambda path: "/lora_" in path or path.startswith("projector/")
  for path in before:
    if trains(path):
      assert not np.array_equal(before[path], after[path]), path
      assert after[path].dtype == np.float32, path
    else:
      assert np.array_equal(before[path], after[path]), path  # bit-identical base
      if not path.endswith(("/kernel_q", "/kernel_scale")):  # the recipe's frozen_dtype, saved as stored
        assert after[path].dtype == jnp.bfloat16, path
  quantized = [p for p in after if p.endswith("/kernel_q")]
  assert len(quantized) == (7 if stage == "finetune_qlora" else 0)  # q, k, v, o, gate, up, down (stacked)
  # AdamW's mu and nu for each trained leaf, plus step counts; nothing for the frozen base.
  opt = _opt_leaves(workdir, 3)
  shapes = sorted(np.shape(v) for v in opt.values() if np.ndim(v) > 0)
  assert shapes == sorted(2 * [after[p].shape for p in after if trains(p)])
  if stage == "finetune_qlora":  # (the harder case of the two; a forward costs a compile)
    _assert_workdir_runs_as_its_merged_export(world, workdir, tmp_path / "merged")


def _assert_workdir_runs_as_its_merged_export(world, workdir, merged):
  """The workdir loads as a model (config.json keeps the lora spec) and runs its adapters over the quantized base
  as `convert jax-to-hf` merges them into dequantized float kernels."""
  cli.main(["convert", "jax-to-hf", str(workdir), str(merged)])
  image = sorted(glob.glob(os.path.join(world["images"], "*.png")))[0]
  got, want = (session_logits(str(path), load_images([image])) for path in (workdir, merged))
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def session_logits(model, images, adapter=None, question="What is in the image?"):
  """Prefill logits of one prompt about `images`, as `generate --model MODEL [--adapter DIR]` computes them."""
  session = load_session(str(model), adapter=None if adapter is None else str(adapter))
  logits, mask = session.engine.forward([Prompt.of(session.processor.prepare(question, images))])
  return logits[0][mask[0]]


@pytest.mark.parametrize("stage", ["finetune_lora", "finetune_qlora"])
def test_tiny_lora_run_memorizes_captions(world, tmp_path, stage):
  """lm_head is adapted too: the random base's frozen lm_head after RMSNorm bounds the logits near +-1."""
  workdir = tmp_path / "run"
  train_main.run(F.train_args(world, workdir, stage=stage, total_steps=40, lr=1e-2, checkpoint_every=0,
                              **dict(LORA_OVERRIDES, batch_size=16,
                                     **{"lora.dropout": 0.0, "lora.targets": "language_model/.*"})))
  losses = [r["loss"] for r in F.read_metrics(workdir)]
  assert len(losses) == 40 and losses[-1] < 0.3 * losses[0], losses


def test_qlora_sigkill_then_rerun_equals_uninterrupted(world, tmp_path):
  """Dropout on: the rerun must draw the same masks for the steps it repeats."""
  def command(workdir):
    values = dict(LORA_OVERRIDES, total_steps=4, checkpoint_every=2, **{"data.shuffle": False})
    return [sys.executable, "-m", "llava_jax", "train",
            *F.train_args(world, workdir, stage="finetune_qlora", **values)]
  assert_sigkill_then_rerun_equals_uninterrupted(command, tmp_path)


@pytest.mark.parametrize("override,message", [
    ({"lora.targets": "language_model/nothing_here"}, "lora.targets 'language_model/nothing_here' matches no linear"),
    ({"lora.rank": 0}, "lora.rank must be >= 1, got 0"),
    ({"lora.rank": -4}, "lora.rank must be >= 1, got -4"),
    ({"lora.quantize": "int3"}, "lora.quantize must be one of ('none', 'int8', 'nf4'), got 'int3'"),
    ({"lora.group_size": 32}, "lora.group_size 32 does not divide the 48 inputs of"),
    ({"trainable": "(('.*', True),)"}, "is a quantized frozen kernel"),
    ({"frozen_dtype": "float16"}, "frozen_dtype must be one of ('float32', 'bfloat16'), got 'float16'"),
])
def test_bad_lora_config_exits_2_with_one_line(world, tmp_path, capsys, override, message):
  workdir = tmp_path / "run"
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", *F.train_args(world, workdir, stage="finetune_qlora", **dict(LORA_OVERRIDES, **override))])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err
  assert not workdir.exists()


@pytest.mark.parametrize("config_file", ["llava_v1_5.py", "llava_next.py", "llava_onevision.py"])
@pytest.mark.parametrize("stage", ["finetune_lora", "finetune_qlora"])
def test_lora_recipes_carry_llavas_hyperparameters(config_file, stage):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(F.REPO, "configs", config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f"stage={stage},size=7b")
  assert (c.lora.rank, c.lora.alpha, c.lr) == (128, 256.0, 2e-4)
  assert c.lora.quantize == ("nf4" if stage == "finetune_qlora" else "none")
  assert dict(c.lr_multipliers)["projector/.*"] * c.lr == pytest.approx(2e-5)
  assert build.lora_spec(c).targets_path(("language_model", "layers_3", "mlp", "down_proj"))
  assert not build.lora_spec(c).targets_path(("language_model", "lm_head"))


# ---- the frozen base stored in bfloat16 (frozen_dtype), against the float32 model of the same rounded weights ----

def _trainer(stage, frozen_dtype):
  spec = importlib.util.spec_from_file_location("cfg", F.CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(f"stage={stage},size=tiny")
  cfg.update_from_flattened_dict({"frozen_dtype": frozen_dtype, "batch_size": 8, "data.max_len": 24,
                                  "lora.rank": 4, "warmup_ratio": 0.0})
  model_config = build.runtime_model_config(cfg, build.named_model(cfg.model))
  return build.build_trainer(cfg, model_config, total_steps=4), model_config


@pytest.mark.parametrize("stage", ["finetune_lora", "finetune_qlora"])
def test_bf16_frozen_base_step_equals_float32_step_on_the_rounded_base(stage):
  """Two steps with the base stored bfloat16 against the float32-parameter trainer given the same base rounded to
  bfloat16: the model casts every weight to the compute dtype and a bf16 -> f32 cast is exact, so losses and trained
  parameters are equal exactly; the stored base stays bf16 and bit-identical; trained leaves and optimizer state are
  float32."""
  low, model_config = _trainer(stage, "bfloat16")
  ref, _ = _trainer(stage, "float32")
  rng = np.random.default_rng(0)
  params = jax.device_get(ref.random_params(0, example_batch(model_config)))
  params = _flat(params)
  for path in params:
    if path.endswith("/lora_b"):  # a trained adapter, so the base's rounding reaches its gradients
      params[path] = (0.05 * rng.standard_normal(params[path].shape)).astype(np.float32)
  params = traverse_util.unflatten_dict(params, sep="/")
  # The reference's base: what the bf16 trainer stores (checked below), back in float32.
  rounded = jax.tree.map(lambda a, p: p.astype(a.dtype).astype(p.dtype), nn.unbox(low.abstract_params), params)
  rows, length = 8, 24
  ids = rng.integers(0, model_config.image_token_index, (rows, length)).astype(np.int32)
  ids[:, 1:1 + model_config.tokens_per_tile] = model_config.image_token_index  # one image tile per row
  size = model_config.vision.image_size
  batch = {"input_ids": ids, "attention_mask": np.ones((rows, length), np.int32),
           "loss_mask": np.ones((rows, length), np.float32),
           "pixel_values": rng.standard_normal((rows, 1, size, size, 3)).astype(np.float32)}
  batch = {k: jax.device_put(v, sharding.batch_sharding(low.mesh, v.ndim)) for k, v in batch.items()}
  states = [t.init_state(t.place_params(p)) for t, p in ((low, params), (ref, rounded))]
  for _ in range(2):
    (states[0], m_low), (states[1], m_ref) = [t.step(s, batch) for t, s in zip((low, ref), states)]
    assert float(m_low["loss"]) == float(m_ref["loss"])
  got, want = _flat(jax.device_get(states[0].params)), _flat(jax.device_get(states[1].params))
  stored = _flat(jax.device_get(low.place_params(params)))
  mask = _flat(low.mask)
  assert any(mask.values()) and not all(mask.values())
  for path, value in got.items():
    if mask[path]:
      assert value.dtype == np.float32, path
      np.testing.assert_array_equal(value, want[path], err_msg=path)
    elif path.endswith(("/kernel_q", "/kernel_scale")):  # QLoRA's codes and their float32 scales, as quantized
      assert value.dtype == want[path].dtype, path
      np.testing.assert_array_equal(value, want[path], err_msg=path)
    else:
      assert value.dtype == jnp.bfloat16, path
      np.testing.assert_array_equal(value, stored[path], err_msg=path)  # untouched by training
      np.testing.assert_array_equal(value.astype(np.float32), want[path], err_msg=path)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(states[0].opt_state) if x.ndim)
