"""Optimizer: AdamW after linear warmup then cosine decay, clipping, and regex trainable masks.

Freezing is declared once as `trainable = [(regex, bool), ...]` over "/"-joined parameter paths
(`re.fullmatch`, first match wins, every parameter must match a rule). Frozen parameters go to
`optax.set_to_zero()` through `optax.multi_transform`, so they carry no optimizer state and no
weight decay; the train step never updates them at all, so they stay bit-exact.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import optax

from llava_jax.errors import LlavaJaxError

TRAIN, FROZEN = "train", "frozen"


def param_paths(params: Any) -> Any:
  """A tree like `params` whose leaves are their "/"-joined paths (boxed leaves count as one)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p, simple=True, separator="/"), params,
                                          is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def compile_rules(rules: Sequence) -> list[tuple[re.Pattern, bool]]:
  out = []
  for rule in rules:
    try:
      pattern, flag = rule
      out.append((re.compile(pattern), bool(flag)))
    except (TypeError, ValueError, re.error) as e:
      raise LlavaJaxError(f"config: trainable rule {rule!r} must be (regex, bool): {e}") from None
  return out


def trainable_mask(params: Any, rules: Sequence) -> Any:
  """Tree of bools (True = trains). Raises when some parameter matches no rule."""
  compiled = compile_rules(rules)

  def decide(path: str) -> bool:
    for pattern, flag in compiled:
      if pattern.fullmatch(path):
        return flag
    raise LlavaJaxError(f"config: parameter {path!r} matches no `trainable` rule (add a catch-all like ('.*', False))")

  return jax.tree.map(decide, param_paths(params))


def _decays(path: str) -> bool:
  # Like HF's Trainer: no weight decay on biases and normalization scales.
  return not (path.endswith("/bias") or path.endswith("/scale"))


def schedule(lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
  """0 -> lr linearly over ceil(warmup_ratio * total_steps) steps, then cosine to 0 at total_steps."""
  warmup = min(math.ceil(warmup_ratio * total_steps), total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(cfg, mask: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`cfg` carries lr, warmup_ratio, weight_decay, max_grad_norm, adam_b1/b2/eps."""
  lr = schedule(cfg.lr, total_steps, cfg.warmup_ratio)
  adamw = optax.adamw(lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                      mask=lambda p: jax.tree.map(_decays, param_paths(p)))
  train = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw) if cfg.max_grad_norm > 0 else adamw
  labels = jax.tree.map(lambda m: TRAIN if m else FROZEN, mask)
  return optax.multi_transform({TRAIN: train, FROZEN: optax.set_to_zero()}, labels), lr
