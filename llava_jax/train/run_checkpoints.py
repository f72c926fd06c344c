"""Training checkpoints: an async Orbax CheckpointManager at WORKDIR/checkpoints.

Each step directory holds the items
    params     ocp.args.StandardSave(params)    (what `load_model(WORKDIR)` reads)
    opt_state  the optimizer state's leaves as {"00000": ..., ...} (its tree structure is
               rebuilt from the optimizer, so optax's empty nodes never reach Orbax)
    meta       JSON {"step", "config"}
    data_iter  one JSON file per process: that host's data-iterator position
and WORKDIR/model/ holds the HF config.json and tokenizer/processor files, so a workdir is also
a model folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from llava_jax.config import LlavaConfig, save_config
from llava_jax.errors import LlavaJaxError
from llava_jax.fileio import atomic_output_dir
from llava_jax.train.trainer import TrainState

logger = logging.getLogger("llava_jax.train")

ITEMS = ("params", "opt_state", "meta", "data_iter")


class DataIterHandler(ocp.CheckpointHandler):
  """Per-process JSON files (like grain's handler, but saving a state captured at save() time,
  so a background commit can never see a later position)."""

  def save(self, directory: epath.Path, args: "DataIterSave"):
    path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path.write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: "DataIterRestore" = None) -> Any:
    path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise LlavaJaxError(f"{directory}: no data position for this process ({path.name}; found {found}); "
                          "resume with the same number of processes")
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataIterHandler, for_save=True)
@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataIterHandler, for_restore=True)
@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
  pass


def _leaves_dict(tree: Any) -> dict:
  return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


class Checkpointer:
  """Saves and restores TrainState + data position; `keep` newest steps are kept."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    # cleanup_tmp_directories: a run killed mid-save leaves a tmp step folder; drop it on resume.
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(), "data_iter": DataIterHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._last_saved = None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_state: Any, config: dict) -> int:
    step = int(jax.device_get(state.step))
    if step == self._last_saved or step in self.manager.all_steps():  # the final save after a periodic one
      return step
    self._last_saved = step
    self.manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(_leaves_dict(state.opt_state)),
        meta=ocp.args.JsonSave({"step": step, "config": config}),
        data_iter=DataIterSave(data_state)))
    logger.info("checkpoint: saving step %d to %s", step, self.directory)
    return step

  def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, Any, dict]:
    """(state placed with the target shardings, this process's data position, meta)."""
    step = self.latest_step() if step is None else step
    opt_leaves, opt_def = jax.tree.flatten(abstract.opt_state)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract.params),
          opt_state=ocp.args.StandardRestore({f"{i:05d}": x for i, x in enumerate(opt_leaves)}),
          meta=ocp.args.JsonRestore(),
          data_iter=DataIterRestore()))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
      raise LlavaJaxError(f"{self.directory}/{step}: cannot resume from this checkpoint "
                          f"({' '.join(str(e).split())[:300]}); use a new --workdir") from None
    opt_state = jax.tree.unflatten(opt_def, [out["opt_state"][k] for k in sorted(out["opt_state"])])
    step_array = jax.device_put(jax.numpy.int32(out["meta"]["step"]), abstract.step.sharding)
    return TrainState(step_array, out["params"], opt_state), out["data_iter"], out["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def write_model_folder(workdir: str, config: LlavaConfig, assets_dir: str | None, image_processor=None) -> str:
  """WORKDIR/model/: HF config.json plus tokenizer/processor files (host 0 only, atomically).

  The compute dtype and remat policy are runtime choices, so the architecture is saved without them.
  """
  from llava_jax.weights import hf  # late: pulls safetensors/torch-free helpers only when needed
  out = os.path.join(os.path.abspath(workdir), "model")
  if jax.process_index() != 0:
    return out
  with atomic_output_dir(out, overwrite=True) as tmp:
    if assets_dir:
      hf.copy_assets(assets_dir, tmp)
    save_config(config.replace(dtype="float32", remat_policy="none"), tmp)
    has_processor = any(os.path.exists(os.path.join(tmp, n))
                        for n in ("preprocessor_config.json", "processor_config.json"))
    if image_processor is not None and not has_processor:
      image_processor.save(tmp)
  return out
