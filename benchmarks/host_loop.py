"""How long the host waits per training step on 2 processes: the old loop (a blocking
`process_allgather` every step for the padded length and skip counts, and another for SIGTERM)
vs the current one (the same agreement through the coordination service, the next batch built
while the step runs), side by side in ONE run.

    .venv/bin/python benchmarks/host_loop.py [--steps 40] [--rounds 3] [--batch 4] [--out FILE.json]

Starts itself on 2 local processes x 1 CPU device (launch/local_multiprocess.sh, gloo), and in
each round trains the tiny config on a small captioning world (tests/train_fixtures.py) once with
each loop, alternating. Both are the library's `loop.train`; the old loop only swaps the per-step
exchange (`hosts.HostGather.gather`) back to the two `process_allgather` calls the loop made
before, so the difference is what they cost.

Per loop, over the steady steps (the first step, which compiles, is left out), best round:
  ms/step        wall time between successive step dispatches
  exchange ms    host time per step blocked agreeing with the other host on the next batch
                 (old: the two collectives, which queue behind the running step; new: the
                 coordination-service exchange)
  cap ms         host time per step blocked because STEPS_IN_FLIGHT steps are queued (new only)
  ahead          fraction of steps dispatched while the previous step was still running
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # train_fixtures: the tiny world and config flags


class Probe:
  """Step dispatch times, whether the previous step was still running, and host blocking."""

  def __init__(self):
    self.dispatched, self.behind, self.blocked, self.last = [], [], [], None

  def step(self, original):
    def step(trainer, state, batch):
      now = time.perf_counter()
      if self.last is not None:
        self.behind.append(not self.last.is_ready())
      out = original(trainer, state, batch)
      self.dispatched.append(now)
      self.last = out[1]["loss"]
      return out
    return step

  def timed(self, kind, original):
    def call(*args, **kwargs):
      start = time.perf_counter()
      try:
        return original(*args, **kwargs)
      finally:
        self.blocked.append((kind, len(self.dispatched), time.perf_counter() - start))
    return call

  def summary(self) -> dict:
    steady = self.dispatched[1:]  # from the second step: the first one compiles
    per_step = (steady[-1] - steady[0]) / (len(steady) - 1)
    # Waits between the second and the last dispatch, i.e. those the steady steps paid.
    waited = lambda kind: sum(t for k, n, t in self.blocked if k == kind and 2 <= n < len(self.dispatched))
    return {"ms_per_step": 1e3 * per_step, "exchange_ms": 1e3 * waited("exchange") / (len(steady) - 1),
            "cap_ms": 1e3 * waited("cap") / (len(steady) - 1), "ahead": sum(self.behind[1:]) / len(self.behind[1:])}


def train_once(loop_kind: str, world: dict, workdir: str, args) -> dict:
  from unittest import mock  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import train_fixtures  # pylint: disable=import-outside-toplevel
  from llava_jax.train import hosts, loop, main, trainer  # pylint: disable=import-outside-toplevel
  probe = Probe()
  argv = train_fixtures.train_args(world, workdir, stage="finetune", total_steps=args.steps, batch_size=args.batch,
                                   log_every=args.steps, checkpoint_every=0,
                                   **{"data.template": "plain", "mesh.data": -1})
  config, _ = main.parse_flags(argv)
  gather = train_fixtures.blocking_exchange if loop_kind == "old" else hosts.HostGather.gather
  patches = [mock.patch.object(trainer.Trainer, "step", probe.step(trainer.Trainer.step)),
             mock.patch.object(hosts.HostGather, "gather", probe.timed("exchange", gather))]
  if loop_kind == "new":  # the wait that keeps at most STEPS_IN_FLIGHT steps queued
    patches.append(mock.patch.object(jax, "block_until_ready", probe.timed("cap", jax.block_until_ready)))
  for patch in patches:
    patch.start()
  try:
    loop.train(config, workdir)
  finally:
    for patch in patches:
      patch.stop()
  hosts.barrier(f"host_loop_bench_{os.path.basename(workdir)}")
  if jax.process_index() == 0:
    shutil.rmtree(workdir, ignore_errors=True)
  return probe.summary()


def worker(args) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from llava_jax.train import hosts  # pylint: disable=import-outside-toplevel
  hosts.initialize_distributed()
  world = json.loads(args.world)
  results = {"old": [], "new": []}
  for round_id in range(args.rounds):
    for kind in ("old", "new"):
      results[kind].append(train_once(kind, world, os.path.join(world["root"], f"run_{kind}_{round_id}"), args))
  if jax.process_index() == 0:
    with open(args.worker_out, "w") as f:
      json.dump(results, f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--batch", type=int, default=4, help="global batch (tiny config, 48 tokens per row)")
  parser.add_argument("--out", help="write the results here as JSON")
  parser.add_argument("--world", help=argparse.SUPPRESS)       # set when started as a worker
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.world:
    worker(args)
    return
  import train_fixtures  # pylint: disable=import-outside-toplevel
  root = tempfile.mkdtemp(prefix="host_loop_")
  try:
    world = train_fixtures.make_world(os.path.join(root, "world"))
    worker_out = os.path.join(root, "results.json")
    command = [os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", sys.executable, os.path.abspath(__file__),
               "--steps", str(args.steps), "--rounds", str(args.rounds), "--batch", str(args.batch),
               "--world", json.dumps(world), "--worker-out", worker_out]
    subprocess.run(command, check=True, env=dict(os.environ, QUIET="1", LOG_DIR=os.path.join(root, "logs")))
    with open(worker_out) as f:
      rounds = json.load(f)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  best = {kind: min(runs, key=lambda r: r["ms_per_step"]) for kind, runs in rounds.items()}
  print(f"2 processes x 1 CPU device, tiny config, global batch {args.batch}, {args.steps} steps, "
        f"best of {args.rounds} rounds (load average {os.getloadavg()[0]:.1f})")
  print(f"{'loop':<5} {'ms/step':>8} {'exchange ms':>12} {'cap ms':>7} {'ahead':>6}")
  for kind, r in best.items():
    print(f"{kind:<5} {r['ms_per_step']:8.1f} {r['exchange_ms']:12.1f} {r['cap_ms']:7.1f} {r['ahead']:6.0%}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "best": best, "rounds": rounds}, f, indent=2)


if __name__ == "__main__":
  main()
