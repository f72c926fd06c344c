"""Training as a library call: `train(config, workdir)`, what `llava-jax train` runs.

Calling it again with the same workdir resumes from the latest checkpoint; SIGTERM finishes the
current step, checkpoints and returns. Bad input raises LlavaJaxError.

The host runs ahead of the devices: it dispatches step n, then builds step n + 1's global batch
while step n runs. It waits for the devices only to keep at most STEPS_IN_FLIGHT steps queued,
at log steps (the metrics) and at checkpoints; nothing per step waits on a device collective.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import jax

from llava_jax.errors import LlavaJaxError
from llava_jax.train import build, hosts

logger = logging.getLogger("llava_jax.train")

# The step running and the next one queued behind it: enough to hide the host's work, while
# the input arrays waiting on the devices stay bounded when log_every is large.
STEPS_IN_FLIGHT = 2


def train(config, workdir: str) -> None:
  """Trains as `config` (a ConfigDict with the keys of configs/llava_v1_5.py) says, into `workdir`.

  In a multi-host job every process calls this, after `hosts.initialize_distributed()`.
  """
  build.check_config(config)
  workdir = os.path.abspath(workdir)
  created = not os.path.exists(workdir)
  try:
    _train(config, workdir)
  except LlavaJaxError:
    if created and jax.process_index() == 0 and not _has_checkpoint(workdir):
      shutil.rmtree(workdir, ignore_errors=True)  # a failed first run leaves nothing behind
    raise


def _has_checkpoint(workdir: str) -> bool:
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


@dataclasses.dataclass
class StepInput:
  batch: dict       # global arrays on the devices
  data_state: Any   # this host's iterator position after the batch: what a checkpoint after the step saves
  skipped: int      # unusable samples met so far, all hosts together


class GlobalBatches:
  """Host-local batches -> the global batches of successive steps.

  Hosts may pick different length and tile buckets: with each batch they exchange its length and tile
  count, their skip counts and whether they received SIGTERM through the coordination service, so
  building a batch never waits for the devices, and all hosts stop after the same step.
  """

  def __init__(self, iterator, mesh, pad_id: int):
    self.iterator, self.mesh, self.pad_id = iterator, mesh, pad_id
    self.hosts = hosts.HostGather("batch")

  def next(self, step: int, stop_requested: bool) -> StepInput | None:
    """The input of `step`, or None on every host when any host asked to stop."""
    from llava_jax.data.pipeline import make_global_batch  # pylint: disable=import-outside-toplevel
    local = next(self.iterator)
    agreed = self.hosts.gather(step, [local["input_ids"].shape[1], local["pixel_values"].shape[1], local["skipped"],
                                      stop_requested])
    if agreed[:, 3].any():
      return None
    batch = make_global_batch(local, self.mesh, self.pad_id, length=int(agreed[:, 0].max()),
                              tiles=int(agreed[:, 1].max()))
    return StepInput(batch, self.iterator.get_state(), int(agreed[:, 2].sum()))

  def close(self) -> None:
    hosts.barrier(f"{self.hosts.prefix}/done")  # every host has read every key
    self.hosts.close()


def _train(cfg, workdir: str) -> None:
  from llava_jax.models.llava import example_batch  # pylint: disable=import-outside-toplevel
  from llava_jax.train import run_checkpoints  # pylint: disable=import-outside-toplevel

  source = build.load_source(cfg)
  model_config = build.runtime_model_config(cfg, source.config)
  pipe = build.build_pipeline(cfg, model_config, source.assets_dir)
  total_steps = cfg.total_steps or pipe.steps_per_epoch
  trainer = build.build_trainer(cfg, model_config, total_steps)
  config_dict = json.loads(cfg.to_json_best_effort())
  resolved = dict(config_dict, resolved={"total_steps": total_steps, "mesh": dict(trainer.mesh.shape),
                                         "processes": jax.process_count(), "devices": jax.device_count()})

  ckpt = run_checkpoints.Checkpointer(workdir, cfg.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state, data_state, meta = ckpt.restore(trainer.abstract_state())
    if meta.get("config") != config_dict:
      logger.warning("resuming %s with a config that differs from the checkpoint's", workdir)
    logger.info("resumed from step %d", meta["step"])
  else:
    if source.params is None:
      params = trainer.random_params(cfg.seed, example_batch(model_config))
    else:
      params = trainer.place_params(source.params, cfg.seed)
    state, data_state = trainer.init_state(params), None
    run_checkpoints.write_model_folder(workdir, model_config, source.assets_dir, pipe.image_processor)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2, sort_keys=True)
  source = None  # the host copy of the weights is no longer needed

  try:
    step = _run_steps(cfg, trainer, state, GlobalBatches(pipe.iterator(data_state), trainer.mesh, pipe.pad_id),
                      ckpt, workdir, total_steps, config_dict)
  finally:
    ckpt.close()
  logger.info("stopped at step %d of %d; workdir %s", step, total_steps, workdir)


def _run_steps(cfg, trainer, state, inputs: GlobalBatches, ckpt, workdir: str, total_steps: int,
               config_dict: dict) -> int:
  """Steps until `total_steps` or a SIGTERM, then the final checkpoint; returns the last step."""
  from llava_jax.train import metrics  # pylint: disable=import-outside-toplevel
  step = int(jax.device_get(state.step))
  sink = metrics.MetricsSink(workdir, total_steps, step, progress=cfg.progress_bar)
  throughput = metrics.Throughput()
  preemption = hosts.Preemption()
  data_state = inputs.iterator.get_state()
  upcoming = inputs.next(step + 1, preemption.requested) if step < total_steps else None
  pending_tokens, pending_slots, in_flight = [], 0, collections.deque()
  try:
    while upcoming is not None:
      if len(in_flight) == STEPS_IN_FLIGHT:
        jax.block_until_ready(in_flight.popleft())
      current = upcoming
      state, step_metrics = trainer.step(state, current.batch)
      step += 1
      in_flight.append(step_metrics["loss"])
      pending_tokens.append(step_metrics["tokens"])
      pending_slots += current.batch["attention_mask"].size
      data_state = current.data_state
      # Built while this step runs on the devices.
      upcoming = inputs.next(step + 1, preemption.requested) if step < total_steps else None
      if step % cfg.log_every == 0 or step == total_steps:
        fetched = jax.device_get(step_metrics)
        tokens = float(sum(jax.device_get(pending_tokens)))
        throughput.add(tokens)
        sink.write({"step": step, "loss": float(fetched["loss"]), "lr": float(fetched["lr"]),
                    "grad_norm": float(fetched["grad_norm"]), "tokens_per_s": throughput.rate(),
                    "packing_efficiency": tokens / pending_slots, "skipped": current.skipped})
        pending_tokens, pending_slots = [], 0
      if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
        ckpt.save(state, data_state, config_dict)
    if step < total_steps:
      logger.warning("SIGTERM on a process: every process checkpoints after step %d, then exits", step)
    ckpt.save(state, data_state, config_dict)  # the final (or preemption) checkpoint
    ckpt.wait()
    inputs.close()
  finally:
    preemption.close()
    sink.close()
  return step
