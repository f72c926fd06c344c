"""Where training metrics go: WORKDIR/metrics.jsonl, TensorBoard (tensorboardX, no TensorFlow
needed) under WORKDIR/tensorboard, and a tqdm bar on stderr. Only process 0 writes."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

# tokens_per_s counts real tokens (nonzero attention mask); packing_efficiency is real tokens / row slots.
FIELDS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "packing_efficiency", "skipped")


class MetricsSink:

  def __init__(self, workdir: str, total_steps: int, start_step: int, progress: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._bar = self._tb = None
    if not self.enabled:
      return
    if start_step:
      _truncate_after(self.path, start_step)  # a resumed run rewrites what the killed one logged later
    self._tb = summary_writer_class()(os.path.join(workdir, "tensorboard"))
    if progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, dynamic_ncols=True, unit="step")

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    record = {k: _plain(v) for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(f"train/{key}", value, record["step"])
    if self._bar is not None:
      self._bar.n = record["step"]
      self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
      self._bar.refresh()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


def summary_writer_class():
  """tensorboardX's SummaryWriter, imported with torch hidden: tensorboardX imports torch, if
  installed, only to accept torch tensors (2 s with bytecode, 10 s without), and we log floats."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter


class Throughput:
  """Tokens per second between logged steps (the device work is only known done at a fetch)."""

  def __init__(self):
    self.start, self.tokens = time.perf_counter(), 0.0

  def add(self, tokens: float) -> None:
    self.tokens += tokens

  def rate(self) -> float:
    now = time.perf_counter()
    rate = self.tokens / max(now - self.start, 1e-9)
    self.start, self.tokens = now, 0.0
    return rate


def _plain(value):
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
  with open(path, "w") as f:
    f.writelines(kept)
