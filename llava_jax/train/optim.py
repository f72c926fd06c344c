"""Optimizer: AdamW after linear warmup then cosine decay, clipping, and per-parameter learning rates.

What trains, and how fast, is declared by regex rules over "/"-joined parameter paths (`re.fullmatch`,
first match wins, every parameter must match a rule): `trainable = [(regex, bool), ...]` and
`lr_multipliers = [(regex, multiplier), ...]`. They make one tree of multipliers, a trainable
parameter's own and 0 for a frozen one. Parameters at 0 go to `optax.set_to_zero()` through
`optax.multi_transform`, so they carry no optimizer state and no weight decay; the train step never
updates them at all, so they stay bit-exact. The others share one AdamW (one clipping norm); a
multiplier m scales a parameter's update by m, which is AdamW at learning rate m x lr (the decoupled
weight decay scales with it, as in a PyTorch parameter group).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import optax

from llava_jax.errors import LlavaJaxError

TRAIN, FROZEN = "train", "frozen"


def param_paths(params: Any) -> Any:
  """A tree like `params` whose leaves are their "/"-joined paths (boxed leaves count as one)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p, simple=True, separator="/"), params,
                                          is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _rule_values(params: Any, rules: Sequence, key: str, convert: Callable, expected: str) -> Any:
  """Tree like `params` of each parameter's value by the first rule whose regex fullmatches its path."""
  compiled = []
  for rule in rules:
    try:
      pattern, value = rule
      compiled.append((re.compile(pattern), convert(value)))
    except (TypeError, ValueError, re.error) as e:
      raise LlavaJaxError(f"config: {key} rule {rule!r} must be (regex, {expected}): {e}") from None

  def decide(path: str):
    for pattern, value in compiled:
      if pattern.fullmatch(path):
        return value
    raise LlavaJaxError(f"config: parameter {path!r} matches no `{key}` rule (add a catch-all like ('.*', ...))")

  return jax.tree.map(decide, param_paths(params))


def _multiplier(value) -> float:
  value = float(value)
  if not value >= 0:
    raise ValueError(f"multiplier {value} is negative")
  return value


def trainable_mask(params: Any, rules: Sequence) -> Any:
  """Tree of bools (True = trains). Raises when some parameter matches no rule."""
  return _rule_values(params, rules, "trainable", bool, "bool")


def lr_multipliers(params: Any, trainable_rules: Sequence, multiplier_rules: Sequence = ((".*", 1.0),)) -> Any:
  """Tree of floats: each parameter's learning-rate multiplier, 0 where `trainable_rules` freeze it."""
  scales = _rule_values(params, multiplier_rules, "lr_multipliers", _multiplier, "float >= 0")
  return jax.tree.map(lambda trains, scale: scale if trains else 0.0, trainable_mask(params, trainable_rules), scales)


def trained(multipliers: Any) -> Any:
  """Tree of bools: the parameters that train (a nonzero multiplier)."""
  return jax.tree.map(lambda m: float(m) != 0, multipliers)


def _decays(path: str) -> bool:
  # Like HF's Trainer: no weight decay on biases and normalization scales.
  return not (path.endswith("/bias") or path.endswith("/scale"))


def schedule(lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
  """0 -> lr linearly over ceil(warmup_ratio * total_steps) steps, then cosine to 0 at total_steps."""
  warmup = min(math.ceil(warmup_ratio * total_steps), total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(cfg, multipliers: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`cfg` carries lr, warmup_ratio, weight_decay, max_grad_norm, adam_b1/b2/eps; `multipliers` is
  `lr_multipliers`' tree (a tree of bools counts True as 1)."""
  lr = schedule(cfg.lr, total_steps, cfg.warmup_ratio)
  adamw = optax.adamw(lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                      mask=lambda p: jax.tree.map(_decays, param_paths(p)))
  train = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw) if cfg.max_grad_norm > 0 else adamw
  labels = jax.tree.map(lambda m: TRAIN if m else FROZEN, trained(multipliers))
  tx = optax.multi_transform({TRAIN: train, FROZEN: optax.set_to_zero()}, labels)
  if all(float(m) in (0.0, 1.0) for m in jax.tree.leaves(multipliers)):
    return tx, lr  # no scaling step: the optimizer state (and checkpoints) of runs before lr_multipliers
  scales = jax.tree.map(float, multipliers)
  scale = optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, m: u * m, updates, scales))
  return optax.chain(tx, scale), lr
