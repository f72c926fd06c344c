"""Train state and the ONE jitted train step (sharded by the logical-axis rules).

The loss is the cross-entropy summed over the answer tokens of the whole global batch divided
by their count, so it is the same on any mesh, any number of hosts and any number of gradient
accumulation microbatches. Gradients are taken only w.r.t. trainable parameters, so XLA prunes
the backward pass of frozen towers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llava_jax import sharding
from llava_jax.data.pipeline import FEATURE_INDEX, FEATURE_WEIGHTS
from llava_jax.errors import LlavaJaxError
from llava_jax.image_tokens import FeatureMix
from llava_jax.models import lora
from llava_jax.train import hosts, optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any


def masked_ce_sum(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of token cross-entropies, number of target tokens); position t-1 predicts token t."""
  weights = loss_mask[:, 1:].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), input_ids[:, 1:])
  return jnp.sum(ce * weights), jnp.sum(weights)


def feature_index(batch: dict):
  """The batch's image_feature_index for the model: a FeatureMix where the batch has weights (OneVision)."""
  if FEATURE_WEIGHTS in batch:
    return FeatureMix(batch[FEATURE_INDEX], batch[FEATURE_WEIGHTS])
  return batch.get(FEATURE_INDEX)


def split_trainable(params: Any, mask: Any) -> tuple[Any, Any]:
  """(trainable, frozen) trees with None where a leaf belongs to the other one."""
  return (jax.tree.map(lambda m, p: p if m else None, mask, params),
          jax.tree.map(lambda m, p: None if m else p, mask, params))


def merge_trainable(mask: Any, trainable: Any, frozen: Any) -> Any:
  return jax.tree.map(lambda m, t, f: t if m else f, mask, trainable, frozen)


def _microbatches(batch: dict, count: int, mesh: Mesh) -> dict:
  """(B, ...) -> (count, B/count, ...). Microbatch a holds rows a, a+count, ..., so every device
  keeps its own rows (no resharding) and each microbatch is spread over all batch devices."""
  def one(x):
    x = x.reshape((x.shape[0] // count, count) + x.shape[1:]).swapaxes(0, 1)
    spec = P(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.tree.map(one, batch)


def make_step_fn(model: nn.Module, tx: optax.GradientTransformation, mask: Any, lr_schedule: Callable,
                 mesh: Mesh, grad_accum_steps: int = 1, seed: int = 0) -> Callable:
  """The pure train step: (state, batch) -> (new state, metrics of this step).

  Dropout (LoRA's, the only one) draws from `seed`, the step and the microbatch, so a resumed run repeats it."""

  def loss_sum(trainable, frozen, mb, dropout_key):
    params = merge_trainable(mask, trainable, frozen)
    logits, _ = model.apply({"params": params}, mb["input_ids"], mb["pixel_values"], mb["attention_mask"],
                            image_feature_index=feature_index(mb), rngs={"dropout": dropout_key})
    total, count = masked_ce_sum(logits, mb["input_ids"], mb["loss_mask"])
    return total, count

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def step(state: TrainState, batch: dict):
    trainable, frozen = split_trainable(state.params, mask)
    step_key = jax.random.fold_in(jax.random.key(seed), state.step)
    if grad_accum_steps == 1:
      (total, count), grads = grad_fn(trainable, frozen, batch, step_key)
    else:
      def body(carry, mb_and_index):
        total, count, grads = carry
        mb, index = mb_and_index
        (t, c), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(step_key, index))
        return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), None
      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (total, count, grads), _ = jax.lax.scan(
          body, (jnp.float32(0), jnp.float32(0), zeros),
          (_microbatches(batch, grad_accum_steps, mesh), jnp.arange(grad_accum_steps)))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    # Frozen leaves get zero "gradients" only to fill the tree multi_transform expects; their
    # updates are discarded below, so XLA removes all of it.
    full_grads = merge_trainable(mask, grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    new_trainable = optax.apply_updates(trainable, split_trainable(updates, mask)[0])
    params = merge_trainable(mask, new_trainable, frozen)
    metrics = {
        "loss": total / denom,
        "grad_norm": optax.tree.norm(grads),
        "lr": lr_schedule(state.step),
        "target_tokens": count,
        "tokens": jnp.sum(batch["attention_mask"] > 0).astype(jnp.float32),
    }
    return TrainState(state.step + 1, params, opt_state), metrics

  return step


def store_frozen(abstract_params: Any, mask: Any, dtype: str) -> Any:
  """The boxed abstract params with every frozen floating leaf stored in `dtype` (e.g. a bf16 base under LoRA).

  Trained leaves stay float32, and so do their gradients and optimizer state. A quantized kernel's scales keep
  float32: its codes were computed against them (quantize.py), and they are a small fraction of the kernel."""
  def one(path, box, trains):
    leaf = nn.unbox(box)
    if trains or not jnp.issubdtype(leaf.dtype, jnp.floating) or lora.is_quantized(path):
      return box
    return box.replace_boxed(jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(dtype)))
  return jax.tree.map(one, optim.param_paths(abstract_params), abstract_params, mask,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


@dataclasses.dataclass
class Trainer:
  """Everything the step needs, compiled once for one mesh.

  `abstract_params` is the boxed tree from `jax.eval_shape(model.init, ...)["params"]`, in the dtypes the state
  stores (`store_frozen`).
  """
  model: nn.Module
  tx: optax.GradientTransformation
  mask: Any
  lr_schedule: Callable
  mesh: Mesh
  abstract_params: Any
  grad_accum_steps: int = 1
  seed: int = 0  # dropout's

  def __post_init__(self):
    self.param_shardings = sharding.tree_shardings(self.abstract_params, self.mesh)
    abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
    self.opt_shardings = sharding.tree_shardings(abstract_opt, self.mesh)
    self.state_shardings = TrainState(sharding.replicated(self.mesh), self.param_shardings, self.opt_shardings)
    self.abstract_opt = nn.unbox(abstract_opt)
    step = make_step_fn(self.model, self.tx, self.mask, self.lr_schedule, self.mesh, self.grad_accum_steps,
                        self.seed)
    self._step = jax.jit(step, in_shardings=(self.state_shardings, None),
                         out_shardings=(self.state_shardings, sharding.replicated(self.mesh)), donate_argnums=0)
    self._compiled = {}  # batch shapes -> executable

  def context(self):
    """The mesh and the logical-axis rules the step is traced under (parameter and batch
    shardings pin the layout; the rules constrain the model's activations on the same mesh)."""
    return sharding.active(self.mesh, sharding.LOGICAL_RULES)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    def sds(x, s):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(self.mesh)),
                      jax.tree.map(sds, nn.unbox(self.abstract_params), self.param_shardings),
                      jax.tree.map(sds, self.abstract_opt, self.opt_shardings))

  def init_state(self, params: Any) -> TrainState:
    """A fresh state around `params` (already placed with `place_params`)."""
    opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
    step = jax.device_put(jnp.int32(0), sharding.replicated(self.mesh))
    return TrainState(step, params, opt_state)

  def random_params(self, seed: int, example: dict) -> Any:
    stored = nn.unbox(self.abstract_params)
    def init(key, ids, pixels, mask):
      params = nn.unbox(self.model.init(key, ids, pixels, mask))["params"]
      return jax.tree.map(lambda p, a: p.astype(a.dtype), params, stored)
    return jax.jit(init, out_shardings=self.param_shardings)(
        jax.random.key(seed), example["input_ids"], example["pixel_values"], example["attention_mask"])

  def place_params(self, params: Any, seed: int = 0) -> Any:
    """Host arrays (identical on every process) -> global arrays with the param shardings, in the dtypes of
    `abstract_params` (float32, or `store_frozen`'s dtype for a frozen leaf).

    With LoRA (`model.config.lora`), `params` may be the base model's: its targeted kernels are quantized as the
    spec says and fresh adapters drawn from `seed` are added (lora.from_base)."""
    spec = self.model.config.lora
    if spec is not None:
      params = lora.from_base(params, nn.unbox(self.abstract_params), spec, jax.random.key(seed))
    stored = nn.unbox(self.abstract_params)
    if jax.tree.structure(params) != jax.tree.structure(stored):
      raise LlavaJaxError("init: the checkpoint's parameter tree does not match the model built from its config")
    return sharding.place(jax.tree.map(lambda x, a: np.asarray(x).astype(a.dtype, copy=False), params, stored),
                          self.param_shardings)

  def compile(self, state: TrainState, global_batch: dict):
    """The step's executable for these arguments: arrays, or ShapeDtypeStructs with shardings
    (`abstract_state()`), which compiles it without any memory for the state."""
    with self.context():
      return self._step.lower(state, global_batch).compile()

  def step(self, state: TrainState, global_batch: dict) -> tuple[TrainState, dict]:
    """One optimizer step. Each new batch shape (length bucket) is compiled ahead of time, and
    processes meet at a barrier before running it: hosts finish compiling at different times,
    and CPU (gloo) collectives give up on a peer after 30 s."""
    key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(global_batch.items()))
    compiled = self._compiled.get(key)
    if compiled is None:
      compiled = self._compiled[key] = self.compile(state, global_batch)
      hosts.barrier(f"llava_jax_compiled_{len(self._compiled)}")
    return compiled(state, global_batch)

