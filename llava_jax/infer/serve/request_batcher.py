"""The request batcher: one worker thread owns the engine and runs concurrent requests together.

Requests arrive from many threads (the server's handlers) through a bounded queue. The worker
takes the first waiting request, keeps collecting for up to `wait_s` (or until `max_batch`),
groups what it got by sampling settings (the engine's settings are per batch, not per row), and
runs each group through `engine.stream` as ONE left-padded batch. Every decode chunk is handed
to each request's sink as soon as it arrives, so streaming and non-streaming requests can share
a batch. A request ends at EOS, when its sink reports a stop string, or at its own token limit
(rows of one batch may ask for different limits: the batch runs to the largest).

The engine is only touched from the worker thread, so it needs no locking. A failing batch
fails its requests, never the worker.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Hashable, Protocol, Sequence

import numpy as np

from llava_jax.infer.generate import Prompt
from llava_jax.infer.sampling import SamplingParams

log = logging.getLogger(__name__)

_POLL_S = 0.1  # how often an idle worker checks whether it should stop


class Sink(Protocol):
  """Where one request's output goes. Called from the worker thread only."""

  def feed(self, tokens: np.ndarray) -> bool:
    """New generated tokens (possibly ending with EOS). Returns True when the request is complete
    (e.g. it produced one of its stop strings) and wants no more tokens."""

  def finish(self, reason: str) -> None:
    """The request ended: "stop" (EOS or stop string) or "length" (its token limit)."""

  def fail(self, error: BaseException) -> None:
    """The request could not be completed."""

  @property
  def cancelled(self) -> bool:
    """True once nobody waits for the output any more (the client went away)."""


class Overloaded(Exception):
  """The queue is full; the caller should retry later."""


@dataclasses.dataclass(eq=False)
class Job:
  """One request: its prompt, token limit, sampling settings and where the output goes.

  `sampling.seed` is used as given when `seeded`; unseeded sampled requests get a fresh seed per
  batch (greedy ignores the seed).
  """
  prompt: Prompt
  max_new_tokens: int
  sampling: SamplingParams
  sink: Sink
  seeded: bool = False


def group_key(job: Job) -> Hashable:
  """Jobs with equal keys can run in one batch.

  Greedy decoding ignores every other setting, so all greedy jobs share one key. A seeded sampled
  job runs alone: the engine draws one batch-wide random stream, so a row's sample would depend
  on its neighbours and the seed would not reproduce the answer.
  """
  s = job.sampling
  if s.temperature == 0:
    return ("greedy", s.repetition_penalty)
  if job.seeded:
    return ("seeded", id(job))
  return ("sampled", s.temperature, s.top_k, s.top_p, s.repetition_penalty)


def group_jobs(jobs: Sequence[Job]) -> list[list[Job]]:
  """Groups by `group_key`, in order of each group's first arrival."""
  groups: dict[Hashable, list[Job]] = {}
  for job in jobs:
    groups.setdefault(group_key(job), []).append(job)
  return list(groups.values())


class RequestBatcher:
  """Owns `engine` (anything with `stream(prompts, max_new_tokens, params)` and `eos_token_ids`)."""

  def __init__(self, engine, max_batch: int = 8, wait_s: float = 0.01, max_queue: int = 256):
    if max_batch < 1:
      raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    self.engine = engine
    self.max_batch = max_batch
    self.wait_s = max(0.0, wait_s)
    self._queue: queue.Queue[Job] = queue.Queue(max_queue)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._seeds = itertools.count(int(time.time_ns() % 2**31))
    self.batch_sizes: list[int] = []  # rows of every batch run, for tests and logs

  def start(self) -> None:
    if self._thread is None:
      self._stop.clear()
      self._thread = threading.Thread(target=self._run, name="llava-jax-batcher", daemon=True)
      self._thread.start()

  def stop(self, timeout: float = 30.0) -> None:
    """Stops after the batch in progress; requests still queued fail."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout)
      self._thread = None
    while True:
      try:
        job = self._queue.get_nowait()
      except queue.Empty:
        break
      _safe(job.sink.fail, RuntimeError("the server is shutting down"))

  def submit(self, job: Job) -> None:
    if self._stop.is_set() or self._thread is None:
      raise Overloaded("the generation worker is not running")
    try:
      self._queue.put_nowait(job)
    except queue.Full:
      raise Overloaded(f"{self._queue.maxsize} requests are already waiting") from None

  # ---- worker thread -------------------------------------------------------------------------

  def _run(self) -> None:
    while not self._stop.is_set():
      jobs = self._collect()
      for group in group_jobs(jobs):
        try:
          self._run_group(group)
        except BaseException as e:  # pylint: disable=broad-except  (the worker must survive anything)
          log.exception("generation batch of %d request(s) failed", len(group))
          for job in group:
            _safe(job.sink.fail, e)

  def _collect(self) -> list[Job]:
    """Blocks for a first job, then gathers more for up to `wait_s` (fewer if max_batch is hit)."""
    try:
      jobs = [self._queue.get(timeout=_POLL_S)]
    except queue.Empty:
      return []
    deadline = time.monotonic() + self.wait_s
    while len(jobs) < self.max_batch:
      remaining = deadline - time.monotonic()
      try:
        jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
      except queue.Empty:
        break
    # Clients that left while waiting cost nothing.
    return [job for job in jobs if not job.sink.cancelled]

  def _run_group(self, jobs: list[Job]) -> None:
    params = jobs[0].sampling
    if params.temperature > 0 and not jobs[0].seeded:
      params = dataclasses.replace(params, seed=next(self._seeds) % 2**31)
    self.batch_sizes.append(len(jobs))
    counts = [0] * len(jobs)
    active = [True] * len(jobs)
    limit = max(job.max_new_tokens for job in jobs)
    chunks = self.engine.stream([job.prompt for job in jobs], limit, params)
    try:
      for rows in chunks:
        for i, job in enumerate(jobs):
          if active[i]:
            active[i] = self._advance(job, rows[i], counts, i)
        if not any(active):
          break  # closing the generator abandons the rest of the batch's work
    finally:
      chunks.close()
    for i, job in enumerate(jobs):
      if active[i]:  # the engine stopped at the batch's limit, which is this row's limit or less
        _safe(job.sink.finish, "length")

  def _advance(self, job: Job, tokens: np.ndarray, counts: list[int], i: int) -> bool:
    """Hands row i its new tokens; returns whether the row still wants more."""
    if job.sink.cancelled:
      return False
    tokens = np.asarray(tokens)[:job.max_new_tokens - counts[i]]
    if len(tokens) == 0:
      return True
    counts[i] += len(tokens)
    try:
      stopped = job.sink.feed(tokens)
    except Exception as e:  # pylint: disable=broad-except  (one broken request must not end the batch)
      log.exception("request output failed")
      _safe(job.sink.fail, e)
      return False
    if stopped or int(tokens[-1]) in self.engine.eos_token_ids:
      _safe(job.sink.finish, "stop")
      return False
    if counts[i] >= job.max_new_tokens:
      _safe(job.sink.finish, "length")
      return False
    return True


def _safe(callback, *args) -> None:
  try:
    callback(*args)
  except Exception:  # pylint: disable=broad-except
    log.exception("request callback failed")
