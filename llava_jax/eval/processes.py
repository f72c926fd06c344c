"""`llava-jax eval` on the processes of a multi-host job (one JAX job: SLURM, a TPU pod, launch/local_multiprocess.sh).

--out must be a folder every process sees. Every process reads every answers file of a task, then asks every
n-th of the questions none of them answers yet and appends its answers to its own file, TASK/answers.P.jsonl;
once all are done, process 0 reads all the files and writes results.json once. A rerun (with any number of
processes) resumes from the union of the files. Each process answers on its own devices: no device collective,
only the coordination service's barriers and key-value store (llava_jax.train.hosts).
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
from typing import Sequence, TypeVar

T = TypeVar("T")
_barriers = itertools.count()  # every process passes the same barriers in the same order


@dataclasses.dataclass(frozen=True)
class Share:
  """This process's part of the questions: every `count`-th pending question, from the `index`-th."""
  index: int = 0
  count: int = 1

  def mine(self, pending: Sequence[T]) -> list[T]:
    return list(pending[self.index::self.count])

  def answers_path(self, task_folder: str) -> str:
    return os.path.join(task_folder, "answers.jsonl" if self.count == 1 else f"answers.{self.index}.jsonl")

  @property
  def writes_results(self) -> bool:
    return self.index == 0


def current() -> Share:
  """The share of this process (Share() outside a multi-process job)."""
  import jax
  return Share(jax.process_index(), jax.process_count())


def answers_paths(task_folder: str) -> list[str]:
  """The task's answers files: one process's answers.jsonl and the answers.P.jsonl of multi-process runs."""
  return sorted(glob.glob(os.path.join(task_folder, "answers.jsonl")) +
                glob.glob(os.path.join(task_folder, "answers.*.jsonl")))


def barrier(share: Share, what: str) -> None:
  """Waits until every process gets here (nothing to wait for alone)."""
  if share.count > 1:
    from llava_jax.train import hosts
    hosts.barrier(f"llava_jax/eval/{next(_barriers)}/{what}")


def gather(share: Share, items: list) -> list:
  """The items of every process, concatenated in process order."""
  if share.count == 1:
    return list(items)
  from llava_jax.train import hosts
  return [item for part in hosts.all_gather_json("eval", items) for item in part]
