"""`llava-jax plan` on the tiny config over fake CPU devices (each run a process of its own, as the command is)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.batch_size=8", "--config.data.max_len=64"]

# The tiny architecture of configs/models.py, counted by hand.
CLIP_LAYER = 2 * 64 + 4 * (32 * 32 + 32) + (32 * 48 + 48) + (48 * 32 + 32)  # 2 layer norms, q/k/v/out, fc1, fc2
VISION = 32 + 7 * 7 * 3 * 32 + 17 * 32 + 2 * 64 + 3 * CLIP_LAYER  # class, patches, positions, 2 norms, 3 layers
PROJECTOR = (32 * 48 + 48) + (48 * 48 + 48)
LLAMA_LAYER = 2 * 48 + 4 * 48 * 48 + 3 * 48 * 80  # 2 RMS norms, q/k/v/o, gate/up/down
LANGUAGE = 2 * 128 * 48 + 48 + 2 * LLAMA_LAYER  # embeddings, lm_head, final norm, 2 layers


def _plan(tmp_path, *args, stage="finetune"):
  out = tmp_path / "plan.json"
  config = ["--config", f"configs/llava_v1_5.py:stage={stage},size=tiny"]
  result = subprocess.run([sys.executable, "-m", "llava_jax.cli", "plan", *config, *TINY, *args, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  return result, out


def _report(tmp_path, *args, stage="finetune") -> dict:
  result, out = _plan(tmp_path, *args, stage=stage)
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


def test_lora_holds_a_bf16_base_and_float32_trainables_and_leaves_out_the_cpus_float32_copies(tmp_path):
  """The LoRA stage (rank 128 on the decoder layers' 7 linear layers, bf16 frozen base) in bf16 compute: the base at
  2 bytes, adapters and projector at 4 with their gradients and AdamW moments; XLA:CPU's float32 copies of the bf16
  weights (at least the decoder layers' kernels, at most the whole base) are left out of the total."""
  report = _report(tmp_path, "--mesh", "data=1", "--config.dtype=bfloat16", "--config.grad_accum_steps=2",
                   stage="finetune_lora")
  adapters = 128 * 2 * (4 * (48 + 48) + 2 * (48 + 80) + (80 + 48))  # rank x layers x (in + out) of each
  trainable, frozen = PROJECTOR + adapters, VISION + LANGUAGE
  assert report["parameters"] == {"count": frozen + trainable, "trainable": trainable}
  assert report["config"]["frozen_dtype"] == "bfloat16"
  held = report["per_device_bytes"]
  assert held["parameters"] == 2 * frozen + 4 * trainable
  assert held["gradients"] == 4 * trainable and 0 <= held["optimizer_state"] - 2 * 4 * trainable <= 16
  upcasts = report["xla_cpu"]["bf16_argument_upcasts"]
  assert 4 * 2 * (4 * 48 * 48 + 3 * 48 * 80) <= upcasts <= 4 * frozen
  assert held["total"] == report["xla_cpu"]["total"] - upcasts  # accumulation: no gradient copy to remove


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


def test_bf16_generation_program_holds_its_weights_once_in_bf16(tmp_path):
  """A bf16 model's engine holds each weight once, at 2 bytes (replicated here: the mesh splits only the rows), and
  a bf16 KV cache."""
  from configs import models
  from llava_jax.config import LlavaConfig
  from llava_jax.infer.generate import bucket_length
  config = LlavaConfig.from_hf_dict(models.hf_dict("tiny"), source="tiny")
  text, pixels = config.text, config.vision.image_size ** 2 * 3 * 4  # a device's row: one float32 image
  report = _report(tmp_path, "--mesh", "data=2", "--decode-batch", "2", "--decode-new-tokens", "20",
                   "--config.dtype=bfloat16")
  decode = report["decode"]
  assert decode["dtype"] == "bfloat16" and decode["weights"] == 2 * (VISION + PROJECTOR + LANGUAGE)
  cache = text.num_hidden_layers * 2 * text.num_key_value_heads * bucket_length(64 + 20) * text.head_dim * 2
  held = decode["per_device_bytes"]
  assert decode["weights"] + pixels <= held["arguments"] <= decode["weights"] + pixels + 1024  # + ids, mask, ...
  assert cache <= held["outputs"] <= cache + 2 * 4 * (bucket_length(64 + 20) + 64)
