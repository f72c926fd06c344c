"""Training across processes: resume after SIGKILL equals an uninterrupted run bit for bit (one
device), SIGTERM checkpoints and exits 0, and 2 processes x 2 devices equal 1 process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train_fixtures as F

STEPS = 4
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}

# Runs `llava-jax train` with a hook that interrupts it: SIGKILL right after the step-2
# checkpoint is committed, or a real SIGTERM delivered while step 3 runs.
HOOKED = """
import os, signal, sys
from llava_jax.train import checkpoint, main, trainer
mode = os.environ["TEST_INTERRUPT"]
save, step = checkpoint.Checkpointer.save, trainer.Trainer.step

def hooked_save(self, state, *args):
  done = save(self, state, *args)
  if mode == "kill" and done == 2:
    self.wait()
    os.kill(os.getpid(), signal.SIGKILL)
  return done

def hooked_step(self, state, batch):
  if mode == "term" and int(state.step) == 2:
    os.kill(os.getpid(), signal.SIGTERM)
  return step(self, state, batch)

checkpoint.Checkpointer.save, trainer.Trainer.step = hooked_save, hooked_step
main.main(sys.argv[1:])
"""


def train_command(world, workdir, **overrides):
  # No shuffling: hosts take every other record, so 2 hosts' global batch holds the same samples
  # as 1 host's (in another row order, which the token-mean loss does not see).
  values = {"total_steps": STEPS, "checkpoint_every": 2, "data.template": "plain", "data.shuffle": False}
  values.update(overrides)
  return [sys.executable, "-m", "llava_jax.train.main", *F.train_args(world, workdir, stage="finetune", **values)]


def start(command, env):
  return subprocess.Popen(command, env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(proc, timeout=900):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """All the runs, started together where they are independent."""
  root = tmp_path_factory.mktemp("processes")
  world = F.make_world(root / "world")
  # The 1-device runs compile the same programs: a persistent XLA cache compiles them once.
  one_device = dict(ONE_DEVICE, JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  paths = {name: root / name for name in ("reference", "resumed", "multi")}
  reference = start(train_command(world, paths["reference"]), one_device)
  multi = start([os.path.join(F.REPO, "launch", "local_multiprocess.sh"), "2", "--devices", "2",
                 *train_command(world, paths["multi"], **{"mesh.data": 2, "mesh.fsdp": 2})],
                {"QUIET": "1", "LOG_DIR": str(root / "multi_logs")})
  interrupted = []
  resumed = train_command(world, paths["resumed"])
  hooked = [sys.executable, "-c", HOOKED, *resumed[3:]]
  for mode in ("kill", "term"):
    interrupted.append(finish(start(hooked, dict(one_device, TEST_INTERRUPT=mode))))
    folder = paths["resumed"] / "checkpoints"
    interrupted[-1] += (sorted(os.listdir(folder)) if folder.is_dir() else [],)
  final = finish(start(resumed, one_device))
  return {"paths": paths, "reference": finish(reference), "multi": finish(multi), "kill": interrupted[0],
          "term": interrupted[1], "final": final, "logs": root / "multi_logs"}


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
  logs = "".join(open(os.path.join(runs["logs"], f)).read()[-2000:] for f in sorted(os.listdir(runs["logs"])))
  assert code == 0, err + logs
  expected, got = F.final_params(runs["paths"]["reference"]), F.final_params(runs["paths"]["multi"])
  for path in expected:
    error, scale = np.linalg.norm(got[path] - expected[path]), np.linalg.norm(expected[path])
    assert error <= 1e-5 * scale, (path, error / scale)
  config = json.load(open(runs["paths"]["multi"] / "config.json"))
  assert config["resolved"]["processes"] == 2 and config["resolved"]["devices"] == 4
