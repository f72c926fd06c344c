"""Shared pieces of the training tests: a tiny captioning world (tokenizer, images, LLaVA JSON)
and helpers to run `llava-jax train` in-process or as a subprocess. Holds no tests itself."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tokenizer_fixture import build_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
CONFIG = os.path.join(REPO, "configs", "llava_v1_5.py")
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}
SHAPES = ["circle", "square", "triangle", "star"]


def draw(color, shape, size=28):
  img = np.full((size, size, 3), 255, np.uint8)
  yy, xx = np.mgrid[:size, :size]
  c = size / 2
  region = {"circle": (yy - c) ** 2 + (xx - c) ** 2 < (size / 3) ** 2,
            "square": (abs(yy - c) < size / 3) & (abs(xx - c) < size / 3),
            "triangle": (yy > size / 5) & (abs(xx - c) < (yy - size / 5) / 2),
            "star": (abs(yy - c) < size / 8) | (abs(xx - c) < size / 8)}[shape]
  img[region] = COLORS[color]
  return Image.fromarray(img)


def caption_records(n=16):
  """n image-caption pairs: '<image>' then 'A red circle.' style captions (plain template)."""
  records = []
  for i in range(n):
    color, shape = list(COLORS)[i % 4], SHAPES[(i // 4) % 4]
    records.append({"id": f"cap{i}", "image": f"{color}_{shape}.png",
                    "conversations": [{"from": "human", "value": "<image>"},
                                      {"from": "gpt", "value": f"A {color} {shape}."}]})
  return records


def make_world(root, records=None):
  """Writes tokenizer/, images and data.json under root; returns a dict of paths."""
  root = str(root)
  tok_dir = os.path.join(root, "tokenizer")
  corpus = [f"A {c} {s}." for c in COLORS for s in SHAPES] + ["What is in the image? Describe it briefly."]
  build_tiny_tokenizer(tok_dir, corpus=corpus * 4)
  for color in COLORS:
    for shape in SHAPES:
      draw(color, shape).save(os.path.join(root, f"{color}_{shape}.png"))
  data = os.path.join(root, "data.json")
  with open(data, "w") as f:
    json.dump(caption_records() if records is None else records, f)
  return {"root": root, "tokenizer": tok_dir, "json": data, "images": root}


def train_args(world, workdir, stage="pretrain", config=CONFIG, **overrides):
  """argv for `llava-jax train` on the tiny config with small, fast settings."""
  values = {"tokenizer": world["tokenizer"], "data.json": world["json"], "data.image_folder": world["images"],
            "data.max_len": 48, "data.buckets": "(48,)", "batch_size": 4, "total_steps": 3,
            "lr": 1e-3, "warmup_ratio": 0.0, "progress_bar": False, "mesh.data": 1, "mesh.fsdp": 1,
            "mesh.tensor": 1}
  values.update(overrides)
  argv = [f"--config={config}:stage={stage},size=tiny", f"--workdir={workdir}"]
  return argv + [f"--config.{k}={v}" for k, v in values.items()]


def cli(argv, env=None, timeout=600, check=False):
  """Runs `python -m llava_jax train ARGV` in a fresh process (own XLA_FLAGS)."""
  full_env = dict(os.environ, **(env or {}))
  proc = subprocess.run([sys.executable, "-m", "llava_jax", "train", *argv], env=full_env, capture_output=True,
                        text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"train exited {proc.returncode}:\n{proc.stderr[-4000:]}")
  return proc


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def final_params(workdir):
  """The latest checkpoint's params as a flat {path: numpy array} dict (read as saved: adapters included)."""
  import orbax.checkpoint as ocp
  from llava_jax.weights.model_folder import restore_params
  checkpoints = os.path.join(str(workdir), "checkpoints")
  params = restore_params(os.path.join(checkpoints, str(ocp.CheckpointManager(checkpoints).latest_step()), "params"))
  flat = {}
  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}/")
      else:
        flat[f"{prefix}{k}"] = np.asarray(v)
  walk(params, "")
  return flat


def blocking_exchange(self, round_id, values):
  """`hosts.HostGather.gather` as the training loop did it before the host-to-host exchange: the
  batch's sizes and skip count, then the SIGTERM flag (the last value), each in a blocking device
  collective."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  del self, round_id
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray(values[:-1], np.int64)))
  stops = np.asarray(multihost_utils.process_allgather(np.int32(values[-1]))).reshape(-1, 1)
  return np.concatenate([sizes.reshape(len(stops), -1), stops], axis=1)
