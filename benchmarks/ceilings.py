"""This machine's two physical ceilings, measured: float32 matmul FLOP/s and matrix-vector bandwidth.

- FLOP/s: a large square float32 matmul (2 n^3 FLOPs), best of several runs, with numpy (its
  BLAS), JAX (XLA CPU) and PyTorch; the ceiling is the best of the three.
- Bandwidth: a float32 matrix-vector product with a matrix far larger than the caches (the
  matrix bytes / time, best of several); it reads every weight once as batch-1 decode does.
  The ceiling is the best of numpy, JAX and PyTorch.

Run alone: `python benchmarks/ceilings.py` prints both as JSON.
"""

from __future__ import annotations

import json
import time

import numpy as np


def _best(fn, repeats: int) -> float:
  fn()  # warm-up (and compile)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def matmul_flops(n: int = 2048, repeats: int = 8) -> dict:
  """float32 (n, n) @ (n, n): FLOP/s per library and the best."""
  import jax
  import jax.numpy as jnp
  import torch

  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  jmm = jax.jit(jnp.matmul)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  flops = 2.0 * n ** 3
  out = {}
  with torch.no_grad():
    for name, fn in (("numpy", lambda: a @ b), ("jax", lambda: jmm(ja, jb).block_until_ready()),
                     ("torch", lambda: ta @ tb)):
      out[name] = flops / _best(fn, repeats)
  return {"n": n, "per_library": out, "best": max(out.values()), "best_library": max(out, key=out.get)}


def matvec_bandwidth(rows: int = 16384, cols: int = 8192, repeats: int = 10) -> dict:
  """float32 (rows, cols) @ (cols,): matrix bytes / time per library and the best (512 MiB default)."""
  import jax
  import jax.numpy as jnp
  import torch

  rng = np.random.default_rng(1)
  m = rng.standard_normal((rows, cols), np.float32)
  x = rng.standard_normal((cols,), np.float32)
  jm, jx = jnp.asarray(m), jnp.asarray(x)
  jmv = jax.jit(jnp.matmul)
  tm, tx = torch.from_numpy(m), torch.from_numpy(x)
  nbytes = float(m.nbytes)
  out = {}
  with torch.no_grad():
    for name, fn in (("numpy", lambda: m @ x), ("jax", lambda: jmv(jm, jx).block_until_ready()),
                     ("torch", lambda: tm @ tx)):
      out[name] = nbytes / _best(fn, repeats)
  del jm, m, tm
  return {"matrix_bytes": nbytes, "per_library": out, "best": max(out.values()),
          "best_library": max(out, key=out.get)}


def measure() -> dict:
  return {"matmul_flops": matmul_flops(), "matvec_bandwidth": matvec_bandwidth()}


if __name__ == "__main__":
  print(json.dumps(measure(), indent=2))
