"""What every part of benchmarks/gpu.py shares: the sizes, the inputs, the model FLOPs, timing.

Imports no framework at module level: the orchestrator imports this file too.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


@dataclasses.dataclass(frozen=True)
class TrainCase:
  name: str
  stage: str  # configs/llava_v1_5.py stage: pretrain (projector trains) | finetune (projector + language model)
  layers: int | None  # language-model layers (None: the model's own)
  batch: int
  length: int


@dataclasses.dataclass(frozen=True)
class Size:
  model: str  # configs/models.py name
  recipe_size: str  # configs/llava_v1_5.py size (dtype, remat)
  dtype: str  # generation compute dtype
  text_tokens: int  # prompt = BOS + image tokens + text_tokens
  new_tokens: int
  batches: tuple[int, ...]
  repeats: dict  # batch -> timed repeats (best kept)
  train: tuple[TrainCase, ...]
  train_steps: int  # timed steps after the compiling one (best kept)
  compile_prompt: int  # prompt tokens of the compile-time part
  matmul_n: int
  read_bytes: int  # the array the read-bandwidth reduction sums over (~ the 7B weights in bf16)
  torch_compile_backend: str
  attention: tuple[int, int, int, int] = (8192, 32, 32, 128)  # tokens, query heads, kv heads, head_dim (Vicuna-7B)


SIZES = {
    "7b": Size("llava-1.5-7b", "7b", "bfloat16", 31, 64, (1, 16, 64), {1: 3, 16: 2, 64: 2},
               (TrainCase("stage1", "pretrain", None, 16, 640), TrainCase("stage2", "finetune", 8, 8, 1024),
                TrainCase("stage2_2048", "finetune", 8, 4, 2048)),
               3, 4096, 8192, 14 * 10 ** 9, "inductor"),
    # Every part at toy scale, for the CPU test; torch.compile traces with the eager backend there
    # (the same static-cache compiled path without inductor's C++ build).
    "toy": Size("tiny", "tiny", "float32", 15, 24, (1, 2), {1: 3, 2: 3},
                (TrainCase("stage1", "pretrain", None, 4, 48), TrainCase("stage2", "finetune", 1, 2, 64)),
                2, 256, 256, 16 * 2 ** 20, "eager", attention=(256, 4, 2, 32)),
}


def hf_dict(size: Size, layers: int | None = None) -> dict:
  """The config.json of the size's model, its language model cut to `layers` layers."""
  from configs import models
  d = models.hf_dict(size.model)
  if layers is not None:
    d["text_config"]["num_hidden_layers"] = layers
  return d


def llava_config(size: Size, layers: int | None = None):
  from llava_jax.config import LlavaConfig
  return LlavaConfig.from_hf_dict(hf_dict(size, layers), source=f"configs/models.py:{size.model}")


# ---- inputs ------------------------------------------------------------------------------------

def prompt_ids(config, rows: int, text_tokens: int, seed: int = 0) -> np.ndarray:
  """(rows, 1 + image tokens + text_tokens) int32: BOS, one image's tokens, random text."""
  rng = np.random.default_rng(seed)
  top = min(config.text.vocab_size, config.image_token_index) - 1
  image = np.full((rows, config.tokens_per_tile), config.image_token_index)
  text = rng.integers(3, top, (rows, text_tokens))
  return np.concatenate([np.full((rows, 1), config.bos_token_id or 1), image, text], axis=1).astype(np.int32)


def pixels(config, rows: int, seed: int = 0) -> np.ndarray:
  """(rows, 1, H, W, 3) float32: one random image per row (NHWC; transformers takes it NCHW)."""
  v = config.vision
  return np.random.default_rng(seed + 1).standard_normal((rows, 1, v.image_size, v.image_size, 3)).astype(np.float32)


def train_batch(config, case: TrainCase, seed: int = 0) -> dict:
  """A fixed batch: BOS + image tokens + random text, loss on the text after the image."""
  ids = prompt_ids(config, case.batch, case.length - 1 - config.tokens_per_tile, seed)
  loss_mask = np.zeros(ids.shape, np.float32)
  loss_mask[:, 1 + config.tokens_per_tile:] = 1
  return {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int32), "loss_mask": loss_mask,
          "pixel_values": pixels(config, case.batch, seed)}


# ---- FLOPs and bytes (analytic) ----------------------------------------------------------------

def text_layer_params(t) -> int:
  return (2 * t.hidden_size * t.num_attention_heads * t.head_dim + 2 * t.hidden_size * t.num_key_value_heads
          * t.head_dim + 3 * t.hidden_size * t.intermediate_size)


def train_flops(config, case: TrainCase) -> float:
  """Model FLOPs of one step: matmuls and causal attention, no recomputation. The frozen tower runs
  forward; the projector forward + both gradients (x3); the language model forward + input gradients
  (x2) when frozen (stage 1), + weight gradients (x3) when it trains (stage 2)."""
  v, t = config.vision, config.text
  tokens = v.num_patches + v.class_tokens
  vision = 2 * v.num_patches * v.num_channels * v.patch_size ** 2 * v.hidden_size
  vision += v.num_hidden_layers * (2 * tokens * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
                                   + 4 * tokens * tokens * v.hidden_size)
  features = config.tokens_per_tile
  projector = 2 * features * (config.vision_feature_size * t.hidden_size + t.hidden_size ** 2)
  s = case.length
  text = t.num_hidden_layers * (2 * s * text_layer_params(t) + 4 * s * (s + 1) / 2 * t.num_attention_heads * t.head_dim)
  text += 2 * s * t.hidden_size * t.vocab_size
  text_passes = 2 if case.stage == "pretrain" else 3
  return case.batch * (vision + 3 * projector + text_passes * text)


def decode_weight_bytes(config) -> int:
  """Bytes of the weights one decode step reads in the compute dtype (layers, final norm, lm_head)."""
  t = config.text
  count = t.num_hidden_layers * (text_layer_params(t) + 2 * t.hidden_size) + t.hidden_size + t.hidden_size * t.vocab_size
  return count * {"bfloat16": 2, "float32": 4}[config.dtype]


# ---- timing ------------------------------------------------------------------------------------

def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
  times = [timed(fn) for _ in range(repeats)]
  return min(times), times


def generation_entry(batch: int, new_tokens: int, ttft: list[float], full: list[float], warmup_s: float) -> dict:
  """TTFT = a whole call for 1 token; decode tokens/s = batch x new_tokens / (T(1 + new_tokens) - T(1))."""
  decode_s = min(full) - min(ttft)
  return {"ttft_s": min(ttft), "generate_s": min(full), "decode_tok_s": batch * new_tokens / decode_s,
          "ms_per_step": 1e3 * decode_s / new_tokens, "ttft_all": ttft, "generate_all": full,
          "warmup_incl_compile_s": warmup_s}
