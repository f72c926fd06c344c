"""Next-token selection as pure functions on float32 logits (B, V), usable inside jit.

The order and definitions follow transformers' generate: repetition penalty first, then
temperature, top-k, top-p, then a categorical draw (or argmax when greedy). Which steps run is
decided by `SamplingFlags` (static, part of the compiled program's key); their values are
runtime arrays (`SamplingValues`), so changing e.g. top_p does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llava_jax.errors import LlavaJaxError

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """What a user asks for. temperature 0 = greedy; top_k 0 and top_p 1 = off; penalty 1 = off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  seed: int = 0

  def __post_init__(self):
    checks = [(self.temperature >= 0, "temperature must be >= 0"), (self.top_k >= 0, "top_k must be >= 0"),
              (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
              (self.repetition_penalty > 0, "repetition_penalty must be > 0")]
    for ok, message in checks:
      if not ok:
        raise LlavaJaxError(f"sampling: {message}, got {self}")

  @property
  def flags(self) -> "SamplingFlags":
    greedy = self.temperature == 0
    return SamplingFlags(greedy=greedy, top_k=not greedy and self.top_k > 0,
                         top_p=not greedy and self.top_p < 1, penalty=self.repetition_penalty != 1)

  def values(self) -> "SamplingValues":
    return SamplingValues(jnp.float32(self.temperature or 1.0), jnp.int32(self.top_k), jnp.float32(self.top_p),
                          jnp.float32(self.repetition_penalty))


class SamplingFlags(NamedTuple):
  greedy: bool
  top_k: bool
  top_p: bool
  penalty: bool


class SamplingValues(NamedTuple):
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  repetition_penalty: jax.Array


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
  """transformers' definition: a seen token's logit is divided by `penalty` if positive, else multiplied.

  seen (B, V) bool marks the tokens already in the sequence (prompt included).
  """
  penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
  return jnp.where(seen, penalized, logits)


def top_k_filter(logits: jax.Array, k: jax.Array) -> jax.Array:
  """Keeps the logits >= the k-th largest (ties at the boundary stay, as in transformers)."""
  k = jnp.clip(k, 1, logits.shape[-1])
  kth = jnp.take_along_axis(jnp.sort(logits, axis=-1)[:, ::-1], jnp.broadcast_to(k - 1, (logits.shape[0], 1)), -1)
  return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: jax.Array) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose probability reaches p (at least one).

  A token stays when the probability mass of the tokens ranked strictly above it is < p, which
  is transformers' rule (drop where the ascending cumulative mass is <= 1 - p).
  """
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = (mass_above < p).at[:, 0].set(True)
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits, NEG_INF)


def process_logits(logits: jax.Array, flags: SamplingFlags, values: SamplingValues,
                   seen: jax.Array | None = None) -> jax.Array:
  """The filtered, temperature-scaled logits a token is drawn from (-inf = excluded)."""
  logits = logits.astype(jnp.float32)
  if flags.penalty:
    logits = apply_repetition_penalty(logits, seen, values.repetition_penalty)
  if flags.greedy:
    return logits
  logits = logits / values.temperature
  if flags.top_k:
    logits = top_k_filter(logits, values.top_k)
  if flags.top_p:
    logits = top_p_filter(logits, values.top_p)
  return logits


def select_token(logits: jax.Array, flags: SamplingFlags, values: SamplingValues, key: jax.Array,
                 seen: jax.Array | None = None) -> jax.Array:
  """(B, V) logits -> (B,) int32 token ids."""
  logits = process_logits(logits, flags, values, seen)
  if flags.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def step_key(seed_key: jax.Array, step) -> jax.Array:
  """The key for step `step`: depends only on (seed, step), so chunked and one-shot decoding agree."""
  return jax.random.fold_in(seed_key, step)
