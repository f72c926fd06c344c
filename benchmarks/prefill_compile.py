"""Compile time and CPU run time of the XLA causal prefill, by prompt bucket and query-block cap.

    .venv/bin/python benchmarks/prefill_compile.py [--lengths 640,1024,2048,4096] [--layers 1] [--run-hidden 768]

Compiles a prefill (queries at slots 0..S-1 writing a KV cache, as the engine's) of LLaVA-1.5-7B's
language model (`--layers` decoder layers, unrolled, float32, kernels output-first: the engine's decode
layout) from abstract inputs, so no weight is allocated, once with the query blocks of
models/attention.causal_xla_attention capped at MAX_QUERY_BLOCKS and once uncapped (128-query blocks,
the layout before the cap). Then times one jitted decoder layer of benchmarks/generate.py's text model
(hidden `--run-hidden`) on the same buckets, both ways: the cap must not slow the CPU prefill.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from llava_jax.config import TextConfig
from llava_jax.models import attention
from llava_jax.models.attention import AttentionMask
from llava_jax.models.llama import LlamaDecoderLayer, LlamaModel, init_cache, rotary_cos_sin

UNCAPPED = 1 << 30


def prefill_inputs(text: TextConfig, length: int):
  cos, sin = rotary_cos_sin(jnp.arange(length)[None], text.head_dim, text.rope_theta, text.rope_scaling)
  segments = jnp.ones((1, length), jnp.int32)
  mask = AttentionMask(jnp.tril(jnp.ones((length, length), bool))[None], segments)
  return cos, sin, mask


def compile_seconds(text: TextConfig, layers: int, length: int, cap: int) -> float:
  attention.MAX_QUERY_BLOCKS = cap
  text = TextConfig(**{**text.__dict__, "num_hidden_layers": layers})
  model = LlamaModel(text, jnp.float32, scan=False, out_first=True, attention="xla")
  embeds = jax.ShapeDtypeStruct((1, length, text.hidden_size), jnp.float32)
  positions = jnp.arange(length)[None]
  _, _, mask = prefill_inputs(text, length)
  cache = jax.eval_shape(lambda: init_cache(text, 1, length, scanned=False))
  params = jax.eval_shape(model.init, jax.random.key(0), embeds, positions, mask, cache, 0)
  fn = jax.jit(lambda p, e, c: model.apply(p, e, positions, mask, c, 0, True))
  start = time.perf_counter()
  fn.lower(params, embeds, cache).compile()
  return time.perf_counter() - start


def run_seconds(hidden: int, length: int, cap: int, rounds: int = 3) -> float:
  attention.MAX_QUERY_BLOCKS = cap
  text = TextConfig(hidden_size=hidden, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=12,
                    head_dim=hidden // 12)
  layer = LlamaDecoderLayer(text, jnp.float32, out_first=True, attention="xla")
  cos, sin, mask = prefill_inputs(text, length)
  h = jax.random.normal(jax.random.key(0), (1, length, hidden))
  cache = {"k": jnp.zeros((12, length, text.head_dim)), "v": jnp.zeros((12, length, text.head_dim))}
  params = layer.init(jax.random.key(1), h, cache, cos, sin, mask, 0)
  fn = jax.jit(lambda p, h, c: layer.apply(p, h, c, cos, sin, mask, 0))
  jax.block_until_ready(fn(params, h, cache))
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, h, cache))
    best = min(best, time.perf_counter() - start)
  return best


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--lengths", default="640,1024,2048,4096")
  ap.add_argument("--layers", type=int, default=1, help="7B decoder layers compiled (32: the whole model)")
  ap.add_argument("--run-hidden", type=int, default=768)
  args = ap.parse_args()
  lengths = [int(n) for n in args.lengths.split(",")]
  capped = attention.MAX_QUERY_BLOCKS
  seven_b = TextConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       head_dim=128, vocab_size=32064)
  report = {}
  for n in lengths:
    row = {"query_block_capped": attention.query_block(n)}
    for name, cap in (("uncapped", UNCAPPED), ("capped", capped)):
      row[f"compile_s_{name}"] = round(compile_seconds(seven_b, args.layers, n, cap), 2)
      row[f"run_s_{name}"] = round(run_seconds(args.run_hidden, n, cap), 4)
    attention.MAX_QUERY_BLOCKS = capped
    report[n] = row
    print(n, json.dumps(row), flush=True)
  print(json.dumps({"layers": args.layers, "by_length": report}, indent=1))


if __name__ == "__main__":
  main()
