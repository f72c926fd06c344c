"""The jitted train step: trainable masks, optimizer state, the loss, freezing, and mesh equality."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from llava_jax import sharding
from llava_jax.data.pipeline import make_global_batch
from llava_jax.errors import LlavaJaxError
from llava_jax.models.attention import emulated_kernels
from llava_jax.models.llava import Llava
from llava_jax.train import build, optim, trainer

from hf_fixtures import IMAGE_TOKEN, our_config, tiny_hf_model

B, S = 8, 40


def make_batch(seed=0, rows=B, length=S):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 120, (rows, length)).astype(np.int32)
  ids[:, 2:18] = IMAGE_TOKEN  # 16 image tokens = one 28px image of 7px patches
  attention = np.ones((rows, length), np.int32)
  loss_mask = np.zeros((rows, length), np.float32)
  for row in range(rows):  # ragged answers and right padding
    end = length - row
    attention[row, end:] = 0
    loss_mask[row, 20 + row % 3:end] = 1
  pixels = rng.standard_normal((rows, 1, 28, 28, 3)).astype(np.float32)
  return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, "pixel_values": pixels}


def opt_config(**kw):
  values = dict(lr=1e-3, warmup_ratio=0.0, weight_decay=0.01, max_grad_norm=1.0, adam_b1=0.9, adam_b2=0.999,
                adam_eps=1e-8)
  values.update(kw)
  return ml_collections.ConfigDict(values)


@pytest.fixture(scope="module")
def setup():
  config = our_config(tiny_hf_model())
  model = Llava(config)
  batch = make_batch()
  example = [batch[k][:1] for k in ("input_ids", "pixel_values", "attention_mask")]
  abstract = jax.eval_shape(model.init, jax.random.key(0), *example)["params"]
  # One host copy of the initial weights, placed onto each trainer's mesh (one init compile).
  init = jax.jit(lambda key, *ex: nn.unbox(model.init(key, *ex))["params"])
  return model, abstract, batch, jax.device_get(init(jax.random.key(0), *example))


def make_trainer(setup, stage, mesh_spec, devices, accum=1, model=None):
  model, abstract = model or setup[0], setup[1]
  mask = optim.trainable_mask(nn.unbox(abstract), build.STAGE_TRAINABLE[stage])
  tx, lr = optim.make_optimizer(opt_config(), mask, total_steps=10)
  mesh = sharding.make_mesh(mesh_spec, devices)
  return trainer.Trainer(model, tx, mask, lr, mesh, abstract, accum)


def run_steps(t, setup, steps=3):
  batch, before = setup[2], setup[3]
  state = t.init_state(t.place_params(before))
  losses = []
  for _ in range(steps):
    state, metrics = t.step(state, make_global_batch(batch, t.mesh))
    losses.append(float(metrics["loss"]))
  return before, state, losses


def flat(tree):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


ONE = {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.fixture(scope="module")
def finetune_one_device(setup):
  t = make_trainer(setup, "finetune", ONE, jax.devices()[:1])
  before, state, losses = run_steps(t, setup)
  return flat(before), flat(state.params), losses


def test_every_parameter_must_match_a_rule(setup):
  with pytest.raises(LlavaJaxError, match="vision_tower/.*matches no `trainable` rule"):
    optim.trainable_mask(nn.unbox(setup[1]), [("projector/.*", True), ("language_model/.*", False)])
  with pytest.raises(LlavaJaxError, match="must be \\(regex, bool\\)"):
    optim.trainable_mask(nn.unbox(setup[1]), [("(unclosed", True)])


@pytest.mark.parametrize("stage,trains", [("pretrain", ("projector",)), ("finetune", ("projector", "language_model"))])
def test_frozen_parameters_have_no_optimizer_state(setup, stage, trains):
  t = make_trainer(setup, stage, ONE, jax.devices()[:1])
  state_paths = [jax.tree_util.keystr(p, simple=True, separator="/")
                 for p, _ in jax.tree_util.tree_flatten_with_path(t.abstract_opt)[0]]
  moment_paths = [p for p in state_paths if "/mu/" in p or "/nu/" in p]
  tops = {p.split("/mu/")[-1].split("/nu/")[-1].split("/")[0] for p in moment_paths}
  assert tops == set(trains)
  n_trainable = sum(1 for leaf in jax.tree.leaves(t.mask) if leaf)
  assert len(moment_paths) == 2 * n_trainable  # one mu and one nu per trainable tensor, nothing else
  assert not any("vision_tower" in p for p in state_paths)


@pytest.fixture(scope="module")
def pretrain_trainer(setup):
  return make_trainer(setup, "pretrain", ONE, jax.devices()[:1])


def test_loss_is_masked_cross_entropy_over_the_global_batch(setup, pretrain_trainer):
  model, _, batch, params = setup
  t = pretrain_trainer
  logits, _ = model.apply({"params": params}, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
  logits = np.asarray(logits, np.float64)[:, :-1]
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  targets = batch["input_ids"][:, 1:]
  token_nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  weights = batch["loss_mask"][:, 1:]
  expected = (token_nll * weights).sum() / weights.sum()  # mean over answer tokens, not over rows
  _, metrics = t.step(t.init_state(t.place_params(params)), make_global_batch(batch, t.mesh))
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
  assert float(metrics["target_tokens"]) == weights.sum()


def test_pretrain_trains_only_the_projector(setup, pretrain_trainer):
  before, state, _ = run_steps(pretrain_trainer, setup, steps=2)
  before, after = flat(before), flat(state.params)
  for path in before:
    if path.startswith("projector/"):
      assert not np.array_equal(before[path], after[path]), path
    else:
      assert np.array_equal(before[path], after[path]), path  # bit-identical


def test_finetune_trains_language_model_not_vision(finetune_one_device):
  before, after, losses = finetune_one_device
  for path in before:
    changed = not np.array_equal(before[path], after[path])
    assert changed == (not path.startswith("vision_tower/")), path
  assert losses[-1] < losses[0]


def test_sharded_mesh_with_accumulation_equals_one_device(setup, finetune_one_device):
  """data=2, fsdp=2, tensor=2 on 8 devices, with 2 accumulation microbatches, 3 steps."""
  t = make_trainer(setup, "finetune", {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), accum=2)
  assert t.param_shardings["language_model"]["lm_head"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  _, state, losses = run_steps(t, setup)
  _, reference, reference_losses = finetune_one_device
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
  for path, value in flat(state.params).items():
    error, scale = np.linalg.norm(value - reference[path]), np.linalg.norm(reference[path])
    assert error <= 1e-5 * scale, (path, error / scale)


def test_splash_attention_on_a_mesh_trains_as_xla(setup, kernel_calls):
  """attention=splash (Pallas interpret mode, one call per device inside shard_map) on data=2, fsdp=2, tensor=2
  takes the step attention=xla takes (loss, gradient norm, new weights): 128-token rows, right padding, the
  second row packed with a sample after the first."""
  batch = make_batch(rows=4, length=128)
  batch["attention_mask"][1, 60:127] = 2
  runs = {}
  for kernel in ("xla", "splash"):
    model = Llava(setup[0].config.replace(attention=kernel))
    t = make_trainer(setup, "finetune", {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), model=model)
    with emulated_kernels():
      state, metrics = t.step(t.init_state(t.place_params(setup[3])), make_global_batch(batch, t.mesh))
    runs[kernel] = [float(metrics["loss"]), float(metrics["grad_norm"])], flat(state.params)
  assert kernel_calls["splash"] == 2  # the decoder's two layers, traced once
  np.testing.assert_allclose(runs["splash"][0], runs["xla"][0], rtol=1e-5)
  for path, value in runs["splash"][1].items():
    reference = runs["xla"][1][path]
    assert np.linalg.norm(value - reference) <= 1e-5 * np.linalg.norm(reference), path


def test_mesh_errors_name_the_problem(setup):
  with pytest.raises(LlavaJaxError, match="needs 16 devices, 8 are available"):
    sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 2})
  assert sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1}).shape["data"] == 4
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})  # 4 attention heads over 8 devices
  with pytest.raises(LlavaJaxError, match="self_attn.*does not divide mesh axes tensor of size 8"):
    sharding.tree_shardings(setup[1], mesh)
