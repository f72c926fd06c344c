"""Training across processes: resume after SIGKILL equals an uninterrupted run bit for bit (one
device), SIGTERM checkpoints and exits 0, 2 processes x 2 devices equal 1 process, and on 2
processes a SIGTERM to one of them stops both after the same step, and the loop issues no
device collective per step yet trains bit for bit as the loop that agreed through blocking device
collectives did."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import train_fixtures as F
from xla_flags import with_device_count, without_device_count

STEPS = 6
ONE_DEVICE = {"XLA_FLAGS": with_device_count(without_device_count(os.environ["XLA_FLAGS"]), 1), "JAX_PLATFORMS": "cpu"}
# The runs compile the same programs as one another: the session's compilation cache (conftest) keeps every one.
EVERY_PROGRAM_CACHED = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

# Runs `llava-jax train` with a hook: SIGKILL right after the step-2 checkpoint is committed, a
# real SIGTERM delivered while step 3 runs (to process 1 only when there are several), or
# counting the calls of the device collectives JAX offers a host (multihost_utils) once the
# steps have begun, except Orbax's own barriers while it saves a checkpoint, and printing the
# count at exit; or agreeing between hosts as the loop did before (`blocking`).
HOOKED = """
import atexit, os, signal, sys, traceback
from jax.experimental import multihost_utils
from llava_jax import cli
from llava_jax.train import hosts, run_checkpoints, trainer
mode = os.environ["TEST_INTERRUPT"]
save, step = run_checkpoints.Checkpointer.save, trainer.Trainer.step
collectives, stepping = [], []

def counted(name):
  original = getattr(multihost_utils, name)
  def call(*args, **kwargs):
    if stepping and not any("/orbax/" in frame.filename for frame in traceback.extract_stack()):
      collectives.append(name)
    return original(*args, **kwargs)
  return call

def hooked_save(self, state, *args):
  done = save(self, state, *args)
  if mode == "kill" and done == 2:
    self.wait()
    os.kill(os.getpid(), signal.SIGKILL)
  return done

def hooked_step(self, state, batch):
  stepping.append(True)
  if mode == "term" and int(state.step) == 2 and os.environ.get("JAX_PROCESS_ID", "1") == "1":
    os.kill(os.getpid(), signal.SIGTERM)
  return step(self, state, batch)

run_checkpoints.Checkpointer.save, trainer.Trainer.step = hooked_save, hooked_step
if mode in ("count", "blocking"):
  for name in ("process_allgather", "broadcast_one_to_all", "sync_global_devices"):
    setattr(multihost_utils, name, counted(name))
  atexit.register(lambda: print(f"device collectives called: {len(collectives)}", file=sys.stderr))
if mode == "blocking":
  sys.path.insert(0, os.environ["TESTS_DIR"])
  import train_fixtures
  hosts.HostGather.gather = train_fixtures.blocking_exchange
cli.main(["train", *sys.argv[1:]])
"""


def train_command(world, workdir, **overrides):
  # No shuffling: hosts take every other record, so 2 hosts' global batch holds the same samples
  # as 1 host's (in another row order, which the token-mean loss does not see).
  values = {"total_steps": STEPS, "checkpoint_every": 2, "data.template": "plain", "data.shuffle": False}
  values.update(overrides)
  return [sys.executable, "-m", "llava_jax", "train", *F.train_args(world, workdir, stage="finetune", **values)]


def hooked(command):
  """The same `llava-jax train` command, run through HOOKED."""
  return [sys.executable, "-c", HOOKED, *command[4:]]


def two_processes(command, logs, **env):
  return start([os.path.join(F.REPO, "launch", "local_multiprocess.sh"), "2", "--devices", "2", *command],
               dict(env, QUIET="1", LOG_DIR=str(logs), **EVERY_PROGRAM_CACHED))


def read_logs(folder):
  return [open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder))]


def checkpoint_steps(workdir):
  folder = workdir / "checkpoints"
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit()) if folder.is_dir() else []


def assert_params_close(expected, got):
  """Within 1e-5 relative per parameter: 2 processes sum the gradients in another order than 1."""
  assert expected.keys() == got.keys()
  for path in expected:
    error, scale = np.linalg.norm(got[path] - expected[path]), np.linalg.norm(expected[path])
    assert error <= 1e-5 * scale, (path, error / scale)


def assert_sigkill_then_rerun_equals_uninterrupted(command, tmp_path):
  """`command(workdir)` (a 1-device `llava-jax train` that checkpoints at step 2) run through, and killed right after
  the step-2 checkpoint then rerun: the same final parameters and the same last two metrics lines (but the rates)."""
  env = dict(ONE_DEVICE, **EVERY_PROGRAM_CACHED)
  run = lambda argv, **extra: subprocess.run(argv, env=dict(os.environ, **env, **extra), capture_output=True,
                                             text=True, timeout=600)
  reference = run(command(tmp_path / "reference"))
  assert reference.returncode == 0, reference.stderr[-3000:]
  killed = run(hooked(command(tmp_path / "resumed")), TEST_INTERRUPT="kill")
  assert killed.returncode == -9 and checkpoint_steps(tmp_path / "resumed") == [2], killed.stderr[-3000:]
  resumed = run(command(tmp_path / "resumed"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  want, got = F.final_params(tmp_path / "reference"), F.final_params(tmp_path / "resumed")
  assert all(np.array_equal(want[p], got[p]) for p in want)
  same = lambda workdir: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in F.read_metrics(workdir)]
  assert same(tmp_path / "resumed")[-2:] == same(tmp_path / "reference")[-2:]


def start(command, env):
  return subprocess.Popen(command, env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(proc, timeout=900):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """All the runs: the 1-device ones alongside the 2-process ones (each kind compiles its own programs), and within
  each kind the first run alone, filling the compilation cache the others load from."""
  root = tmp_path_factory.mktemp("processes")
  world = F.make_world(root / "world")
  one_device = dict(ONE_DEVICE, **EVERY_PROGRAM_CACHED)
  paths = {name: root / name for name in ("reference", "resumed", "multi", "multi_resumed", "multi_blocking")}
  logs = {name: root / f"{name}_logs" for name in ("multi", "multi_term", "multi_resumed", "multi_blocking")}
  mesh = {"mesh.data": 2, "mesh.fsdp": 2}
  multi = two_processes(hooked(train_command(world, paths["multi"], **mesh)), logs["multi"], TEST_INTERRUPT="count")
  reference = finish(start(train_command(world, paths["reference"]), one_device))
  interrupted = []
  resumed = train_command(world, paths["resumed"])
  for mode in ("kill", "term"):
    interrupted.append(finish(start(hooked(resumed), dict(one_device, TEST_INTERRUPT=mode))))
    interrupted[-1] += ([str(step) for step in checkpoint_steps(paths["resumed"])],)
  final = finish(start(resumed, one_device))
  multi = finish(multi)
  multi_resumed = train_command(world, paths["multi_resumed"], **mesh)
  multi_term = finish(two_processes(hooked(multi_resumed), logs["multi_term"], TEST_INTERRUPT="term"))
  multi_term += (checkpoint_steps(paths["multi_resumed"]),)
  multi_final = finish(two_processes(multi_resumed, logs["multi_resumed"]))
  multi_blocking = finish(two_processes(hooked(train_command(world, paths["multi_blocking"], **mesh)),
                                        logs["multi_blocking"], TEST_INTERRUPT="blocking", TESTS_DIR=F.TESTS))
  return {"paths": paths, "reference": reference, "multi": multi, "kill": interrupted[0],
          "term": interrupted[1], "final": final, "logs": logs, "multi_term": multi_term, "multi_final": multi_final,
          "multi_blocking": multi_blocking}


def test_sigkill_then_rerun_equals_uninterrupted_bit_for_bit(runs):
  assert runs["reference"][0] == 0, runs["reference"][1][-3000:]
  code, err, checkpoints = runs["kill"]
  assert code == -9 and checkpoints == ["2"], (code, err[-3000:])
  assert runs["final"][0] == 0, runs["final"][1][-3000:]
  expected, got = F.final_params(runs["paths"]["reference"]), F.final_params(runs["paths"]["resumed"])
  assert expected.keys() == got.keys()
  for path in expected:
    assert np.array_equal(expected[path], got[path]), path
  steps = [r["step"] for r in F.read_metrics(runs["paths"]["resumed"])]
  assert steps == list(range(1, STEPS + 1))  # the killed run's lines after its checkpoint are replaced
  reference_losses = [r["loss"] for r in F.read_metrics(runs["paths"]["reference"])]
  assert [r["loss"] for r in F.read_metrics(runs["paths"]["resumed"])] == reference_losses


def test_sigterm_checkpoints_and_exits_0(runs):
  code, err, checkpoints = runs["term"]
  assert code == 0, err[-3000:]
  assert "3" in checkpoints and "SIGTERM" in err  # stopped after step 3 with a usable checkpoint


def test_two_processes_equal_one(runs):
  code, err = runs["multi"]
  assert code == 0, err + "".join(log[-2000:] for log in read_logs(runs["logs"]["multi"]))
  assert_params_close(F.final_params(runs["paths"]["reference"]), F.final_params(runs["paths"]["multi"]))
  config = json.load(open(runs["paths"]["multi"] / "config.json"))
  assert config["resolved"]["processes"] == 2 and config["resolved"]["devices"] == 4


def test_two_processes_issue_no_device_collective_per_step(runs):
  """Hosts agree on padded lengths, skip counts and the stopping step without any device
  collective, so a host never waits for the running step just to prepare the next one."""
  assert runs["multi"][0] == 0
  for log in read_logs(runs["logs"]["multi"]):
    assert re.findall(r"device collectives called: (\d+)", log) == ["0"], log[-2000:]


def test_two_processes_train_as_the_blocking_exchange_did_bit_for_bit(runs):
  """Running ahead (host-to-host agreement, the next batch built during the step) changes when
  the host works, never what the devices compute."""
  code, err = runs["multi_blocking"]
  logs = read_logs(runs["logs"]["multi_blocking"])
  assert code == 0, err + "".join(log[-2000:] for log in logs)
  for log in logs:  # two collectives per step: the hook did replace the exchange
    assert int(re.findall(r"device collectives called: (\d+)", log)[0]) >= 2 * (STEPS - 1), log[-2000:]
  expected, got = F.final_params(runs["paths"]["multi_blocking"]), F.final_params(runs["paths"]["multi"])
  for path in expected:
    assert np.array_equal(expected[path], got[path]), path
  losses = lambda workdir: [(r["step"], r["loss"], r["skipped"]) for r in F.read_metrics(workdir)]
  assert losses(runs["paths"]["multi"]) == losses(runs["paths"]["multi_blocking"])


def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step(runs):
  code, err, checkpoints = runs["multi_term"]
  logs = read_logs(runs["logs"]["multi_term"])
  assert code == 0, err + "".join(log[-2000:] for log in logs)
  stops = [re.findall(r"every process checkpoints after step (\d+)", log) for log in logs]
  assert stops == [["3"], ["3"]] and checkpoints == [2, 3], (stops, checkpoints)
  assert "SIGTERM: checkpointing" in logs[1] and "SIGTERM: checkpointing" not in logs[0]
  # Re-running the command finishes the job exactly as the uninterrupted 2-process run did.
  code, err = runs["multi_final"]
  assert code == 0, err + "".join(log[-2000:] for log in read_logs(runs["logs"]["multi_resumed"]))
  expected, got = F.final_params(runs["paths"]["multi"]), F.final_params(runs["paths"]["multi_resumed"])
  for path in expected:
    assert np.array_equal(expected[path], got[path]), path
  losses = lambda workdir: [(r["step"], r["loss"]) for r in F.read_metrics(workdir)]
  assert losses(runs["paths"]["multi_resumed"]) == losses(runs["paths"]["multi"])
