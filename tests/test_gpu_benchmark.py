"""benchmarks/gpu.py at toy size on the CPU: every part runs in its worker process and lands in the JSON,
ours' greedy tokens equal transformers' with the same weights in every inference layout, and the table prints."""

import json
import math
import os
import subprocess
import sys

import pytest

from llava_jax.infer import backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu") / "gpu.json"
  proc = subprocess.run([sys.executable, SCRIPT, "--size", "toy", "--out", str(out)], capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text()), proc.stdout


def _positive(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


def test_every_part_finishes(report):
  data, _ = report
  assert list(data["parts"]) == sorted(gpu.PARTS, key=lambda p: gpu.PARTS[p].module)
  assert {name: part["status"] for name, part in data["parts"].items()} == {name: "ok" for name in gpu.PARTS}


def test_parity_with_transformers(report):
  parity = report[0]["parts"]["parity"]["result"]
  assert parity["max_rel_err_default"] < 1e-4 and parity["max_rel_err_highest"] < 1e-5
  assert set(parity["layouts"]) == set(backend.LAYOUTS)
  for name, layout in parity["layouts"].items():
    assert layout["tokens"] == parity["hf_tokens"], name
  assert parity["greedy_identical"] is True


def test_timings_are_measured(report):
  parts = {name: part["result"] for name, part in report[0]["parts"].items()}
  assert _positive(parts["peaks"]["bf16_matmul_tflops"]) and _positive(parts["peaks"]["read_bytes_per_s"])
  for system in ("gen_ours", "gen_hf", "gen_hf_compile"):
    assert set(parts[system]["batches"]) == {"1", "2"}, system
    for entry in parts[system]["batches"].values():
      assert _positive(entry["ttft_s"]) and _positive(entry["generate_s"]), system
  assert parts["gen_ours"]["layout"] == backend.layout_for("cpu").name
  assert set(parts["gen_layouts"]["layouts"]) == {"unrolled", "scanned"}  # the ones whose batch-1 program differs
  for system in ("train_ours", "train_hf"):
    assert set(parts[system]) == {"stage1", "stage2"}, system
    for case in parts[system].values():
      assert _positive(case["step_s"]) and _positive(case["model_tflops_per_s"]) and math.isfinite(case["loss"])
  assert all(_positive(v["compile_s"]) for v in parts["compile"]["layouts"].values())
  attention = parts["attention"]
  assert attention["flash_kernels"] == [] and set(attention["seconds"]) == {"xla", "xla_blocks"}  # a CPU runs no flash kernel
  assert all(_positive(s) for s in attention["seconds"].values())


def test_attention_errors_are_measured_against_float32(report):
  errors = report[0]["parts"]["attention"]["result"]["errors"]
  assert errors["xla"]["float32"] == {"output": 0.0, "grads": 0.0}  # the reference itself
  assert errors["xla_blocks"]["float32"]["output"] < 1e-5 and errors["xla_blocks"]["float32"]["grads"] < 1e-5
  for kernel in errors.values():  # bf16 inputs: rounding, well inside the kernels' 2e-2 bar
    assert 0 < kernel["bfloat16"]["output"] < 2e-2 and 0 < kernel["bfloat16"]["grads"] < 2e-2


def test_table_reads_the_json(report, tmp_path, capsys):
  data, stdout = report
  path = tmp_path / "gpu.json"
  path.write_text(json.dumps(data))
  assert gpu.main(["--table", str(path)]) == 0
  printed = capsys.readouterr().out
  assert printed.strip() == gpu.table(data).strip() and printed.strip() in stdout
  assert "| stage2 (1 layers, 2 x 64) |" in printed and "one packed row of 256 tokens" in printed and "greedy tokens identical in every layout: True" in printed


def test_a_part_past_the_budget_is_skipped(tmp_path):
  out = tmp_path / "gpu.json"
  assert gpu.main(["--size", "toy", "--parts", "peaks", "--budget", "5", "--out", str(out)]) == 0
  assert json.loads(out.read_text())["parts"]["peaks"]["status"] == "skipped"
