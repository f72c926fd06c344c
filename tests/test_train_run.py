"""`llava-jax train` end to end in-process on the 8 fake devices: the workdir, skipped samples,
exit 2 for unusable data and config, and the tiny config learning a small captioning task."""

import json
import logging
import os

import pytest

from llava_jax import cli
from llava_jax.train import hosts
from llava_jax.train import main as train_main

import train_fixtures as F


def bad_records():
  conv = lambda human, gpt: [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
  return [
      {"id": "missing", "image": "nowhere.png", "conversations": conv("<image>", "A red star.")},
      {"id": "corrupt", "image": "corrupt.png", "conversations": conv("<image>", "A red star.")},
      {"id": "two_tags", "image": "red_star.png", "conversations": conv("<image> <image>", "A red star.")},
      {"id": "too_long", "image": "red_star.png", "conversations": conv("<image>", "A red star. " * 20)},
  ]


TEXT_ONLY = {"id": "text_only", "conversations": [{"from": "human", "value": "What is in the image?"},
                                                  {"from": "gpt", "value": "A blue square."}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("train_run")
  # Bad samples first and no shuffling, so two steps of 8 meet each exactly once.
  world = F.make_world(root, bad_records() + [TEXT_ONLY] + F.caption_records())
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
  all_bad = root / "all_bad.json"
  all_bad.write_text(json.dumps(bad_records()))
  world["all_bad"] = str(all_bad)
  return world


def args(world, workdir, **overrides):
  values = {"mesh.data": -1, "batch_size": 8, "data.template": "plain", "data.shuffle": False}
  values.update(overrides)
  return F.train_args(world, workdir, **values)


def test_bad_samples_are_skipped_counted_and_named(world, tmp_path, caplog):
  workdir = tmp_path / "run"
  with caplog.at_level(logging.WARNING, logger="llava_jax.data"):
    train_main.run(args(world, workdir, total_steps=2))
  records = F.read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2]
  assert set(records[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "skipped"}
  assert records[-1]["skipped"] == 4  # the text-only sample trains
  logged = caplog.text
  for sample, reason in [("missing", "missing_image"), ("corrupt", "corrupt_image"),
                         ("two_tags", "image_count_mismatch"), ("too_long", "too_long")]:
    assert f"{sample}: {reason}" in logged
  assert "text_only" not in logged
  # The workdir layout INTERFACE.md promises, and a workdir is a model folder.
  assert {"checkpoints", "metrics.jsonl", "config.json", "model", "tensorboard"} <= set(os.listdir(workdir))
  config = json.load(open(workdir / "config.json"))
  assert config["stage"] == "pretrain" and config["resolved"]["total_steps"] == 2
  assert os.listdir(workdir / "tensorboard")
  assert {"config.json", "tokenizer.json", "preprocessor_config.json"} <= set(os.listdir(workdir / "model"))
  assert set(F.final_params(workdir)) and os.listdir(workdir / "checkpoints") == ["2"]


def test_nothing_usable_exits_2_and_leaves_nothing(world, tmp_path, capsys):
  workdir = tmp_path / "run"
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", *args(world, workdir, **{"data.json": world["all_bad"]})])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("llava-jax: error:") and "no usable sample" in err and "all_bad.json" in err
  assert not workdir.exists()


@pytest.mark.parametrize("override,message", [
    ({"stage": "middle"}, "stage='middle': expected one of"),
    ({"dtype": "float8"}, "dtype must be one of"),
    ({"batch_size": 6}, "batch_size 6 must divide by mesh.data x mesh.fsdp x grad_accum_steps = 8"),
    ({"trainable": "(('projector/.*', True),)"}, "matches no `trainable` rule"),
    ({"mesh.tensor": 3}, "mesh"),
    ({"init": "/nonexistent/model"}, "/nonexistent/model"),
])
def test_bad_config_exits_2(world, tmp_path, capsys, override, message):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", *args(world, tmp_path / "run", **override)])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def test_unknown_config_key_exits_2(world, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", *args(world, tmp_path / "run", learning_rate=1)])
  assert exit_info.value.code == 2
  assert "--config.learning_rate: no such config key" in capsys.readouterr().err


def test_tiny_config_memorizes_captions(tmp_path):
  """16 image-caption pairs: the loss ends far below where it starts."""
  world = F.make_world(tmp_path / "world")
  workdir = tmp_path / "run"
  train_main.run(F.train_args(world, workdir, stage="finetune", total_steps=40, batch_size=16, lr=3e-3,
                              checkpoint_every=0, **{"mesh.data": -1, "data.template": "plain"}))
  losses = [r["loss"] for r in F.read_metrics(workdir)]
  assert len(losses) == 40
  assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("env,wanted", [
    ({}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, True),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, False),
])
def test_distributed_initialize_when_the_environment_asks(env, wanted):
  assert hosts.wants_distributed(env) == wanted


@pytest.mark.parametrize("size", ["7b", "13b", "tiny"])
def test_stage_configs_carry_the_paper_settings(size):
  import importlib.util
  spec = importlib.util.spec_from_file_location("llava_v1_5", F.CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  pretrain, finetune = (module.get_config(f"stage={s},size={size}") for s in ("pretrain", "finetune"))
  for c in (pretrain, finetune):
    for key in ("init", "stage", "trainable", "batch_size", "total_steps", "lr", "warmup_ratio", "weight_decay",
                "checkpoint_every", "seed", "dtype"):
      assert key in c, key
    assert {"json", "image_folder", "template", "max_len"} <= set(c.data) and set(c.mesh) == {"data", "fsdp", "tensor"}
    assert c.total_steps == 0 and c.warmup_ratio == 0.03 and c.weight_decay == 0 and c.data.max_len == 2048
    assert c.trainable[0][0] in ("projector/.*", "vision_tower/.*")
  assert (pretrain.lr, pretrain.batch_size, pretrain.data.template) == (1e-3, 256, "plain")
  assert (finetune.lr, finetune.batch_size, finetune.data.template) == (2e-5, 128, "vicuna_v1")
  assert finetune.trainable[0] == ("vision_tower/.*", False)
