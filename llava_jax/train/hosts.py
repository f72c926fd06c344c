"""The processes of a training job: starting them as one JAX job, agreeing between them through
JAX's coordination service (host-to-host messages, never a device collective), and SIGTERM.

A device collective (e.g. `multihost_utils.process_allgather`) queues behind the step running
on the devices, so a host calling one every step waits for every step to finish and can never
dispatch the next one early. Everything here that runs per step only talks host to host.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
from typing import Sequence

import jax
import numpy as np

logger = logging.getLogger("llava_jax.train")

TIMEOUT_MINUTES = 60  # the slowest host may still be compiling or starting its data workers
_runs = itertools.count()  # every process trains the same sequence of runs, so their numbers agree


def wants_distributed(env=os.environ) -> bool:
  """True when the environment describes a multi-process job (INTERFACE.md `train`, multi-host)."""
  if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
    return True
  if int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  # Cloud TPU VMs of a multi-host slice list every worker here.
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed() -> None:
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


def _client():
  """The coordination-service client, or None in a single-process run."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel  (no public key-value API)
  return distributed.global_state.client if jax.process_count() > 1 else None


def barrier(name: str) -> None:
  """Waits until every process gets here (no device collective, so no collective timeout)."""
  client = _client()
  if client is not None:
    client.wait_at_barrier(name, timeout_in_ms=TIMEOUT_MINUTES * 60 * 1000)


def all_gather_json(name: str, value) -> list:
  """Every process's `value` (small, JSON-able), in process order, through the key-value store."""
  client = _client()
  if client is None:
    return [value]
  prefix = f"llava_jax/{name}/{next(_runs)}"
  client.key_value_set(f"{prefix}/{jax.process_index()}", json.dumps(value))
  timeout = TIMEOUT_MINUTES * 60 * 1000
  return [json.loads(client.blocking_key_value_get(f"{prefix}/{p}", timeout)) for p in range(jax.process_count())]


class HostGather:
  """All-gathers a few integers per round through the coordination service's key-value store.

  Every process calls `gather(round, values)` for the same rounds in the same order. A process
  deletes its key of round r - 1 once it has read everyone's key of round r: a peer that wrote
  round r has read all of round r - 1.
  """

  def __init__(self, name: str):
    self.client = _client()
    self.prefix = f"llava_jax/{name}/{next(_runs)}"
    self._own_keys: list[str] = []

  def gather(self, round_id: int, values: Sequence[int]) -> np.ndarray:
    """(process count, len(values)) int64: row p holds process p's values."""
    if self.client is None:
      return np.asarray([values], np.int64)
    me = jax.process_index()
    key = lambda p: f"{self.prefix}/{round_id}/{p}"
    self.client.key_value_set(key(me), ",".join(str(int(v)) for v in values))
    timeout = TIMEOUT_MINUTES * 60 * 1000
    rows = [values if p == me else self.client.blocking_key_value_get(key(p), timeout).split(",")
            for p in range(jax.process_count())]
    for old in self._own_keys:
      self.client.key_value_delete(old)
    self._own_keys = [key(me)]
    return np.asarray(rows, np.int64)

  def close(self) -> None:
    """Deletes this process's last key. Call after a point every process passes only once it
    has read all keys (e.g. a checkpoint save, which waits for every process)."""
    for old in self._own_keys:
      self.client.key_value_delete(old)
    self._own_keys = []


class Preemption:
  """Whether this process received SIGTERM. Processes agree on the step to stop after by
  exchanging the flag (see loop.GlobalBatches), as they do the padded lengths."""

  def __init__(self):
    self.requested = False
    # In a multi-process job this replaces the SIGTERM handler of JAX's preemption sync manager:
    # Orbax moves that manager's step counter from its background commit thread, so the step
    # it agreed on could differ between processes.
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logger.warning("SIGTERM: checkpointing after this step, then exiting")
    self.requested = True

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)
