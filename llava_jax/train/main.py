"""`llava-jax train --config FILE.py:ARGS --workdir DIR [--config.KEY=VALUE ...]`.

Every process of a multi-host job runs this same command. Re-running it with the same workdir
resumes from the latest checkpoint; SIGTERM finishes the current step, checkpoints and exits 0.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import signal
from typing import Any, Sequence

import numpy as np

from llava_jax.errors import LlavaJaxError

logger = logging.getLogger("llava_jax.train")

STAGE_TRAINABLE = {
    "pretrain": [("projector/.*", True), (".*", False)],
    "finetune": [("vision_tower/.*", False), (".*", True)],
}
DTYPES = ("float32", "bfloat16")


# ---- command line and environment -------------------------------------------------------------

def parse_flags(argv: Sequence[str]):
  """(config, workdir) from absl-style flags, with a private FlagValues so run() is re-entrant."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  values = flags.FlagValues()
  full_argv = ["llava-jax train"] + list(argv)
  # sys_argv: the --config.KEY overrides are found in this list, not in the process's sys.argv.
  config_flags.DEFINE_config_file("config", None, "training config: FILE.py[:ARGS]", flag_values=values,
                                  lock_config=True, sys_argv=full_argv)
  flags.DEFINE_string("workdir", None, "output folder (re-run the same command to resume)", flag_values=values)
  try:
    values(full_argv)
  except (flags.Error, ValueError, KeyError, AttributeError, TypeError, OSError) as e:
    missing = [a for a in e.args if isinstance(a, KeyError)] or ([e] if isinstance(e, KeyError) else [])
    if missing:  # config_flags: AttributeError(KeyError) for an override of a key the config lacks
      key = str(missing[0].args[0] if missing[0].args else "?").strip("'\"")
      raise LlavaJaxError(f"train: --config.{key}: no such config key") from None
    raise LlavaJaxError(f"train: {_last_error_line(e)}") from None
  if values["config"].value is None:
    raise LlavaJaxError("train: --config FILE.py:ARGS is required")
  if not values.workdir:
    raise LlavaJaxError("train: --workdir DIR is required")
  try:
    config = values.config
    config.stage  # config_flags defers load errors to the first access
  except (OSError, ValueError, KeyError, AttributeError, TypeError, SyntaxError) as e:
    raise LlavaJaxError(f"train: --config {argv_value(argv, '--config')}: {_last_error_line(e)}") from None
  return config, values.workdir


def argv_value(argv: Sequence[str], name: str) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(name + "="):
      return arg.split("=", 1)[1]
    if arg == name and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _last_error_line(error: BaseException) -> str:
  """The innermost message: config_flags wraps the real cause in several multi-line layers."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def wants_distributed(env=os.environ) -> bool:
  """True when the environment describes a multi-process job (INTERFACE.md `train`, multi-host)."""
  if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
    return True
  if int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  # Cloud TPU VMs of a multi-host slice list every worker here.
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if not wants_distributed():
    return
  # Cross-process collectives on CPU (tests, local runs) need gloo; TPUs and GPUs ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()  # SLURM and TPU pods are detected by JAX itself
  logger.info("process %d of %d", jax.process_index(), jax.process_count())


# ---- config checks ----------------------------------------------------------------------------

def check_config(cfg) -> None:
  if cfg.stage not in STAGE_TRAINABLE:
    raise LlavaJaxError(f"config: stage must be one of {sorted(STAGE_TRAINABLE)}, got {cfg.stage!r}")
  if cfg.dtype not in DTYPES:
    raise LlavaJaxError(f"config: dtype must be one of {DTYPES}, got {cfg.dtype!r}")
  positive = {"batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps, "log_every": cfg.log_every,
              "keep_checkpoints": cfg.keep_checkpoints}
  for key, value in positive.items():
    if int(value) < 1:
      raise LlavaJaxError(f"config: {key} must be >= 1, got {value}")
  for key in ("total_steps", "checkpoint_every", "lr", "weight_decay", "max_grad_norm"):
    if cfg[key] < 0:
      raise LlavaJaxError(f"config: {key} must be >= 0, got {cfg[key]}")
  if not 0 <= cfg.warmup_ratio <= 1:
    raise LlavaJaxError(f"config: warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
  if not cfg.init and not cfg.tokenizer:
    raise LlavaJaxError("config: random init (init='') needs `tokenizer`, a folder with tokenizer files")


def trainable_rules(cfg) -> list:
  return list(cfg.trainable) if cfg.trainable else STAGE_TRAINABLE[cfg.stage]


# ---- model, data, state -----------------------------------------------------------------------

def _named_model(name: str):
  """configs/models.py (beside the package in a source checkout) by name."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "configs", "models.py")
  spec = importlib.util.spec_from_file_location("llava_jax_configs_models", os.path.normpath(path))
  if spec is None or not os.path.exists(spec.origin):
    raise LlavaJaxError(f"config: model {name!r}: configs/models.py not found next to the package")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get(name)


@dataclasses.dataclass
class Source:
  config: Any            # LlavaConfig (architecture)
  params: Any | None     # host arrays, or None for random init
  assets_dir: str        # tokenizer / processor files


def load_source(cfg) -> Source:
  if cfg.init:
    from llava_jax.weights.checkpoint import load_model  # pylint: disable=import-outside-toplevel
    loaded = load_model(cfg.init)
    return Source(loaded.config, loaded.params, loaded.assets_dir)
  if not os.path.isdir(cfg.tokenizer):
    raise LlavaJaxError(f"config: tokenizer: {cfg.tokenizer}: no such folder")
  return Source(_named_model(cfg.model), None, cfg.tokenizer)


def build_pipeline(cfg, model_config, assets_dir: str):
  from llava_jax.data import images, pipeline, processor  # pylint: disable=import-outside-toplevel
  tokenizer = processor.load_tokenizer(assets_dir)
  image_processor = images.ImageProcessor.from_folder(assets_dir, image_size=model_config.vision.image_size)
  data_config = pipeline.DataConfig.from_config(cfg.data)
  if data_config.image_aspect_ratio:
    image_processor = dataclasses.replace(image_processor, pad_to_square=data_config.image_aspect_ratio == "pad")
  pipe = pipeline.make_pipeline(data_config, tokenizer, image_processor, image_seq_length=model_config.image_seq_length,
                                global_batch_size=cfg.batch_size, seed=cfg.seed,
                                image_token_id=model_config.image_token_index)
  return pipe, image_processor


def build_trainer(cfg, model_config, total_steps: int):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from llava_jax import sharding  # pylint: disable=import-outside-toplevel
  from llava_jax.models.llava import Llava, abstract_params  # pylint: disable=import-outside-toplevel
  from llava_jax.train import optim, trainer  # pylint: disable=import-outside-toplevel
  model = Llava(model_config)
  abstract = abstract_params(model_config)
  mask = optim.trainable_mask(nn.unbox(abstract), trainable_rules(cfg))
  tx, lr = optim.make_optimizer(cfg, mask, total_steps)
  mesh = sharding.make_mesh(cfg.mesh)
  per_step = sharding.batch_devices(mesh) * cfg.grad_accum_steps
  if cfg.batch_size % per_step:
    raise LlavaJaxError(f"config: batch_size {cfg.batch_size} must divide by mesh.data x mesh.fsdp x "
                        f"grad_accum_steps = {per_step}")
  return trainer.Trainer(model, tx, mask, lr, mesh, abstract, cfg.grad_accum_steps)


class Preemption:
  """SIGTERM -> finish the step, checkpoint, exit 0. All processes agree on the stopping step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logger.warning("SIGTERM: checkpointing after this step, then exiting")
    self.requested = True

  def should_stop(self) -> bool:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


# ---- the run ----------------------------------------------------------------------------------

def run(argv: Sequence[str]) -> None:
  cfg, workdir = parse_flags(argv)
  initialize_distributed()
  check_config(cfg)
  workdir = os.path.abspath(workdir)
  created = not os.path.exists(workdir)
  try:
    _train(cfg, workdir)
  except LlavaJaxError:
    import jax  # pylint: disable=import-outside-toplevel
    if created and jax.process_index() == 0 and not _has_checkpoint(workdir):
      shutil.rmtree(workdir, ignore_errors=True)  # a failed first run leaves nothing behind
    raise


def _has_checkpoint(workdir: str) -> bool:
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def _train(cfg, workdir: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from llava_jax.data.pipeline import make_global_batch  # pylint: disable=import-outside-toplevel
  from llava_jax.models.llava import example_batch  # pylint: disable=import-outside-toplevel
  from llava_jax.train import checkpoint, metrics  # pylint: disable=import-outside-toplevel

  source = load_source(cfg)
  model_config = source.config.replace(dtype=cfg.dtype, remat_policy=cfg.remat_policy)
  pipe, image_processor = build_pipeline(cfg, model_config, source.assets_dir)
  total_steps = cfg.total_steps or pipe.steps_per_epoch
  trainer = build_trainer(cfg, model_config, total_steps)
  config_dict = json.loads(cfg.to_json_best_effort())
  resolved = dict(config_dict, resolved={"total_steps": total_steps, "mesh": dict(trainer.mesh.shape),
                                         "processes": jax.process_count(), "devices": jax.device_count()})

  ckpt = checkpoint.Checkpointer(workdir, cfg.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state, data_state, meta = ckpt.restore(trainer.abstract_state())
    if meta.get("config") != config_dict:
      logger.warning("resuming %s with a config that differs from the checkpoint's", workdir)
    logger.info("resumed from step %d", meta["step"])
  else:
    if source.params is None:
      params = trainer.random_params(cfg.seed, example_batch(model_config))
    else:
      params = trainer.place_params(source.params)
    state, data_state = trainer.init_state(params), None
    checkpoint.write_model_folder(workdir, model_config, source.assets_dir, image_processor)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2, sort_keys=True)
  source = None  # the host copy of the weights is no longer needed

  iterator = pipe.iterator(data_state)
  step = int(jax.device_get(state.step))
  sink = metrics.MetricsSink(workdir, total_steps, step, progress=cfg.progress_bar)
  throughput = metrics.Throughput()
  preemption = Preemption()
  pending_tokens = []
  try:
    while step < total_steps:
      batch, skipped = make_global_batch(next(iterator), trainer.mesh, pipe.pad_id)
      state, step_metrics = trainer.step(state, batch)
      step += 1
      pending_tokens.append(step_metrics["tokens"])
      if step % cfg.log_every == 0 or step == total_steps:
        fetched = jax.device_get(step_metrics)
        throughput.add(float(sum(jax.device_get(pending_tokens))))
        pending_tokens = []
        sink.write({"step": step, "loss": float(fetched["loss"]), "lr": float(fetched["lr"]),
                    "grad_norm": float(fetched["grad_norm"]), "tokens_per_s": throughput.rate(),
                    "skipped": skipped})
      if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
        ckpt.save(state, iterator.get_state(), config_dict)
      if preemption.should_stop():
        break
    ckpt.save(state, iterator.get_state(), config_dict)  # the final (or preemption) checkpoint
    ckpt.wait()
  finally:
    preemption.close()
    sink.close()
    ckpt.close()
  logger.info("stopped at step %d of %d; workdir %s", step, total_steps, workdir)


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m llava_jax.train.main ...` is `llava-jax train ...` (same exit-2 contract)."""
  import sys  # pylint: disable=import-outside-toplevel
  from llava_jax import cli  # pylint: disable=import-outside-toplevel
  cli.main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  main()
