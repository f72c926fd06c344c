"""`llava-jax plan` on the tiny config over fake CPU devices (each run a process of its own, as the command is)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "configs/llava_v1_5.py:stage=finetune,size=tiny", "--config.batch_size=8",
        "--config.data.max_len=64"]

# The tiny architecture of configs/models.py, counted by hand.
CLIP_LAYER = 2 * 64 + 4 * (32 * 32 + 32) + (32 * 48 + 48) + (48 * 32 + 32)  # 2 layer norms, q/k/v/out, fc1, fc2
VISION = 32 + 7 * 7 * 3 * 32 + 17 * 32 + 2 * 64 + 3 * CLIP_LAYER  # class, patches, positions, 2 norms, 3 layers
PROJECTOR = (32 * 48 + 48) + (48 * 48 + 48)
LLAMA_LAYER = 2 * 48 + 4 * 48 * 48 + 3 * 48 * 80  # 2 RMS norms, q/k/v/o, gate/up/down
LANGUAGE = 2 * 128 * 48 + 48 + 2 * LLAMA_LAYER  # embeddings, lm_head, final norm, 2 layers


def _plan(tmp_path, *args):
  out = tmp_path / "plan.json"
  result = subprocess.run([sys.executable, "-m", "llava_jax.cli", "plan", *TINY, *args, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  return result, out


def _report(tmp_path, *args) -> dict:
  result, out = _plan(tmp_path, *args)
  assert result.returncode == 0, result.stderr
  assert "per device" in result.stdout and "total" in result.stdout
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def replicated(tmp_path_factory) -> dict:
  """The plan over 4 devices holding every parameter whole (data=4)."""
  return _report(tmp_path_factory.mktemp("replicated"), "--mesh", "data=4")


def test_replicated_bytes_are_the_hand_count_and_fits_flips_at_the_total(tmp_path, replicated):
  report = replicated
  trainable = PROJECTOR + LANGUAGE  # stage 2 freezes the vision tower
  assert report["parameters"] == {"count": VISION + PROJECTOR + LANGUAGE, "trainable": trainable}
  held = report["per_device_bytes"]
  assert held["parameters"] == 4 * (VISION + PROJECTOR + LANGUAGE)  # float32, every device holds all
  assert held["gradients"] == 4 * trainable
  # AdamW's two float32 moments of each trained parameter, plus the optimizer's int32 step counters.
  assert 0 <= held["optimizer_state"] - 2 * 4 * trainable <= 16
  assert held["batch"] == 2 * 64 * (4 + 4 + 4) + 2 * 28 * 28 * 3 * 4  # 8 rows / 4 devices; ids, mask, loss, pixels
  assert held["total"] >= held["parameters"] + held["optimizer_state"] + held["gradients"] + held["batch"]
  assert report["devices"] == 4 and report["rows_per_device_per_microbatch"] == 2

  total = held["total"]
  assert _report(tmp_path, "--mesh", "data=4", "--device-memory", str(total))["fits"] is True
  assert _report(tmp_path, "--mesh", "data=4", "--device-memory", str(total - 1))["fits"] is False


def test_fsdp_splits_each_parameter_or_keeps_it_whole(tmp_path, replicated):
  replicated = replicated["per_device_bytes"]
  split = _report(tmp_path, "--mesh", "data=2,fsdp=2")["per_device_bytes"]
  for key in ("parameters", "gradients"):
    assert replicated[key] / 2 <= split[key] < replicated[key], key
  assert split["batch"] == replicated["batch"]  # the batch is split over data x fsdp either way


@pytest.mark.parametrize("args, message", [
    (["--mesh", "fsdp=two"], "--mesh"),
    (["--mesh", "pipeline=2"], "--mesh"),
    (["--mesh", "fsdp=-1"], "at least 1"),
    (["--mesh", "fsdp=4096"], "at most"),
    (["--mesh", "fsdp=2", "--device-memory", "lots"], "--device-memory"),
    (["--mesh", "fsdp=2", "--device-memory", "-5GB"], "--device-memory"),
    (["--mesh", "fsdp=2", "--config", "configs/nope.py"], "configs/nope.py"),
    (["--mesh", "fsdp=2", "--config.no_such_key=1"], "no_such_key"),
    (["--out-missing"], "plan"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
  result, out = _plan(tmp_path, *args)
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("llava-jax")]
  assert len(lines) == 1 and message in lines[0], result.stderr
  assert not out.exists()


def test_generation_program_holds_the_kv_cache_split_over_data(tmp_path):
  from configs import models
  from llava_jax.config import LlavaConfig
  from llava_jax.infer.generate import bucket_length
  text = LlavaConfig.from_hf_dict(models.hf_dict("tiny"), source="tiny").text
  report = _report(tmp_path, "--mesh", "data=2,tensor=2", "--decode-batch", "4", "--decode-new-tokens", "100")
  decode = report["decode"]
  assert (decode["batch"], decode["prompt_tokens"], decode["new_tokens"], decode["layout"]) == (4, 64, 100, "batched")
  slots = bucket_length(64 + 100)
  # Per device: its 2 of the 4 rows (rows split over data; tensor keeps the cache whole with several rows per shard),
  # k and v of every layer, float32.
  cache = text.num_hidden_layers * 2 * 2 * text.num_key_value_heads * slots * text.head_dim * 4
  held = decode["per_device_bytes"]
  assert cache <= held["outputs"] <= cache + 2 * 4 * (slots + 64)  # + the state: mask, tokens, the output buffer
  assert held["total"] >= held["arguments"] + held["outputs"] - 1 and decode["fits"] is True


def test_bad_decode_batch_exits_2(tmp_path):
  result, out = _plan(tmp_path, "--mesh", "data=1", "--decode-batch", "0")
  assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "--decode-batch" in result.stderr
  assert not out.exists()
