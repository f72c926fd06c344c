"""`llava-jax demo`: the whole LLaVA recipe at miniature scale, on this machine, in minutes.

    data    ShapesWorld images + the instruction engine's LLaVA JSON (train) and held-out images
    stage0  BPE tokenizer, CLIP vision tower (contrastive), LLaMA LM (text) -> WORKDIR/stage0/
    stage1  `llava-jax train` configs/demo_shapes.py:stage=pretrain   (projector only, `plain`)
    stage2  `llava-jax train` configs/demo_shapes.py:stage=finetune   (projector + LM, `vicuna_v1`)
    export  `convert jax-to-hf` -> WORKDIR/export/ (what `generate` / `chat` load)
    eval    held-out accuracy per question type, POPE, blind ablation -> results.json, plot

Stages 1-2 and the export run the real trainer, data pipeline and converters; only the data
world and stage 0 are demo-specific. Sizes and step counts were chosen by measurement on the
2-core demo machine (see `Settings`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import time

import numpy as np

from llava_jax.errors import LlavaJaxError

MARKER = ".llava_jax_demo"
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "configs", "demo_shapes.py")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the demo decides besides stage 1-2 schedules (those live in configs/demo_shapes.py)."""
  n_train: int = 3000
  n_test: int = 400              # ~350 questions per type, so a type's accuracy is known to ~2 points
  # Probabilities of 1-4 objects in a training image (held-out images: uniform). A lookup only
  # has to pick its object where others could be picked instead: denser training scenes make
  # the attention lookups form (see benchmarks/demo.md).
  train_object_counts: tuple = (0.1, 0.2, 0.35, 0.35)
  image_size: int = 96
  patch_size: int = 24           # 4x4 = 16 image tokens (one per layout cell): the LM sequence is what costs on a CPU
  vision_hidden: int = 96        # shape is the hard attribute to read off a patch; narrower towers read it worse
  vision_layers: int = 4
  vision_feature_layer: int = -1  # the layer CLIP's pooling trains directly
  clip_pool: str = "objects"     # stage0.pool_patches: "mean" teaches the LM to read the image's bag of colors
  text_hidden: int = 96          # 3 heads of 32: the narrowest LM that meets the demo's POPE targets
  text_layers: int = 3
  vocab_size: int = 512
  clip_steps: int = 180          # fewer leaves CLIP under-trained on shape
  clip_batch: int = 128
  clip_lr: float = 3e-3
  clip_dense: bool = True         # the region-phrase term (stage0.RegionTargets)
  lm_steps: int = 150            # an LM that knows the templates leaves stage 2 to grounding
  lm_batch: int = 32
  lm_seq: int = 128
  lm_lr: float = 3e-3
  max_len: int = 128             # tokens per stage-2 sample, image tokens included
  conversations_per_image: int = 3  # stage 2 is mostly short QA: grounding is learned there
  stage1_args: tuple = ()        # extra `--config.KEY=VALUE` flags (experiments, tests)
  stage2_args: tuple = ()
  seed: int = 0


FULL = Settings()
# The quick run keeps the 64-wide LM: under two minutes matters more there than the last points.
QUICK = dataclasses.replace(FULL, n_train=1000, n_test=40, text_hidden=64, clip_steps=40, lm_steps=100, lm_batch=8)


def _cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


class Timer:
  """Wall seconds per phase, and CPU seconds (what a busy shared machine cannot inflate)."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self.cpu_seconds: dict[str, float] = {}
    self._start, self._cpu0 = time.perf_counter(), _cpu()

  def phase(self, name: str):
    timer = self

    class _Phase:
      def __enter__(self):
        self.t, self.c = time.perf_counter(), _cpu()

      def __exit__(self, *exc):
        timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t
        timer.cpu_seconds[name] = timer.cpu_seconds.get(name, 0.0) + _cpu() - self.c

    return _Phase()

  def total(self) -> float:
    return time.perf_counter() - self._start

  def cpu_total(self) -> float:
    return _cpu() - self._cpu0


def prepare_workdir(workdir: str) -> str:
  """An empty folder, or one a previous demo wrote (cleared): never someone else's files."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir):
    if not os.path.isdir(workdir):
      raise LlavaJaxError(f"demo: --workdir {workdir} is a file")
    if os.listdir(workdir) and not os.path.exists(os.path.join(workdir, MARKER)):
      raise LlavaJaxError(f"demo: --workdir {workdir} is not empty and was not written by `llava-jax demo`")
    shutil.rmtree(workdir)
  os.makedirs(workdir)
  open(os.path.join(workdir, MARKER), "w").close()
  return workdir


def run_demo(workdir: str, quick: bool = False, settings: Settings | None = None) -> dict:
  """Runs every phase; returns the results dict (also written to WORKDIR/results.json)."""
  from llava_jax.demo import phases, report  # pylint: disable=import-outside-toplevel  (jax import)
  s = settings or (QUICK if quick else FULL)
  workdir = prepare_workdir(workdir)
  timer = Timer()
  with timer.phase("data"):
    data = phases.make_data(workdir, s)
  with timer.phase("stage0"):
    stage0 = phases.stage0(workdir, data, s)
  with timer.phase("stage1"):
    stage1 = phases.train_stage(workdir, "stage1", "pretrain", stage0["model"], data["caption_json"], data, s, quick)
  with timer.phase("stage2"):
    stage2 = phases.train_stage(workdir, "stage2", "finetune", stage1, data["instruct_json"], data, s, quick)
  with timer.phase("eval"):
    export = phases.export(workdir, stage2)
    results = phases.evaluate(export, data, s)
  results = collect_results(results, timer, stage0, stage1, stage2, export, s, quick)
  report.write(workdir, results)
  return results


def collect_results(results: dict, timer: Timer, stage0: dict, stage1: str, stage2: str, export: str,
                    s: Settings, quick: bool) -> dict:
  """The evaluation results plus timings, parameter counts, loss curves and settings: the
  results.json contract (`run_demo` and the notebook both assemble it here)."""
  from llava_jax.demo import phases  # pylint: disable=import-outside-toplevel  (jax import)
  results = dict(results)
  results["seconds"] = dict(timer.seconds, total=timer.total())
  results["cpu_seconds"] = dict(timer.cpu_seconds, total=timer.cpu_total())
  results["params"] = phases.param_counts(export)
  results["losses"] = {"clip": stage0["clip_losses"], "lm": stage0["lm_losses"],
                       "stage1": phases.read_losses(stage1), "stage2": phases.read_losses(stage2)}
  results["settings"] = settings_record(s, quick)
  results["export"] = export
  return results


def settings_record(s: Settings, quick: bool) -> dict:
  """results.json's "settings" (JSON types: tuples as lists)."""
  return json.loads(json.dumps(dict(dataclasses.asdict(s), quick=quick)))


def finished_training(workdir: str, s: Settings, quick: bool) -> dict:
  """What the training phases of a demo that finished in WORKDIR with these settings returned
  (stage 0's dict, stage 1's and stage 2's trainer workdirs): the notebook explores a trained
  demo with them instead of training again."""
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    raise LlavaJaxError(f"demo: {path} not found: `llava-jax demo --workdir {workdir}` has not finished there")
  with open(path) as f:
    results = json.load(f)
  if results.get("settings") != settings_record(s, quick):
    raise LlavaJaxError(f"demo: {path} was trained with other settings than quick={quick} asks for")
  losses = results["losses"]
  return {"stage0": {"model": os.path.join(workdir, "stage0", "model"), "clip_losses": losses["clip"],
                     "lm_losses": losses["lm"]},
          "stage1": os.path.join(workdir, "stage1"), "stage2": os.path.join(workdir, "stage2")}
