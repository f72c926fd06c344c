"""Ours vs transformers on ONE accelerator, side by side in one run, LLaVA-1.5-7B shapes (random weights, bf16).

    python3 benchmarks/gpu.py --size 7b --out results/gpu.json            # on the device machine
    python3 benchmarks/gpu.py --size toy --out /tmp/gpu.json              # any CPU, in about a minute
    python3 benchmarks/gpu.py --table results/gpu.json                    # the README table

Parts (`--parts`, default all, run in this order; each in a subprocess of its own, so JAX and PyTorch
never share the device, with XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 unless set):
  peaks           bf16 matmul FLOP/s (8192^3), read bandwidth (a sum over 14 GB, ~ the 7B weights), copy bandwidth
  parity          tiny model, float32: logits' relative error vs transformers, greedy tokens in every layout
  attention       causal attention alone at 8k tokens on a packed row (4 samples), forward + gradients: the
                  einsum path, its block-skipping form and each flash kernel the backend runs, and their errors
  gen_ours        our Engine: TTFT and decode tokens/s at batch 1, 16, 64 (608-token prompt, 64 new tokens)
  gen_hf          transformers eager (sdpa) generate, the same
  train_ours      one optimizer step of the Trainer `llava-jax train` builds: stage 1 (7B, 16 x 640), stage 2
                  (7B shapes cut to 8 layers, 8 x 1024 and 4 x 2048)
  train_hf        transformers: gradient checkpointing, bf16 autocast, fused AdamW, the same cases
  gen_layouts     our Engine at batch 1 in the inference layouts other than the backend's (infer/backend.py)
  gen_hf_compile  transformers with a static cache and torch.compile'd decode (CUDA graphs)
  compile         compiling our first program for a new 4096-token prompt bucket (also on a CPU at 7B)
Each part appends its result to --out (rewritten atomically after every measurement), so a run
stopped at its time limit keeps what finished. A part runs at most its own time (PART_SECONDS) and
whatever is left of --budget (caps x --cap-scale); one that would start with under MIN_START_S left is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from gpu_common import REPO, SIZES  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Part:
  module: str  # gpu_jax | gpu_torch: where `run(size, save)` lives
  seconds: float  # the most this part may take at 7b (estimates in benchmarks/README.md)


# Adding a part: a `run(size, save)` in gpu_jax.py or gpu_torch.py, its entry in that module's PARTS,
# and one line here.
PARTS = {
    "peaks": Part("gpu_jax", 40),
    "parity": Part("gpu_torch", 60),
    "attention": Part("gpu_jax", 60),
    "gen_ours": Part("gpu_jax", 150),
    "gen_hf": Part("gpu_torch", 90),
    "train_ours": Part("gpu_jax", 120),
    "train_hf": Part("gpu_torch", 80),
    "gen_layouts": Part("gpu_jax", 90),
    "gen_hf_compile": Part("gpu_torch", 150),
    "compile": Part("gpu_jax", 150),
}
MIN_START_S = 20


# ---- the JSON file ---------------------------------------------------------------------------------

def read(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def write(path: str, report: dict) -> None:
  """Atomic: a reader (or a run killed now) sees the old file or the new one, never half of one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=1, default=float)
  os.replace(tmp, path)


def record(path: str, part: str, **fields) -> None:
  report = read(path)
  report["parts"].setdefault(part, {}).update(fields)
  write(path, report)


# ---- one worker process ------------------------------------------------------------------------

def worker(parts: list[str], size_name: str, out: str) -> None:
  import importlib
  size = SIZES[size_name]
  for part in parts:
    run = importlib.import_module(PARTS[part].module).PARTS[part]
    start = time.perf_counter()
    save = lambda result: record(out, part, status="running", seconds=time.perf_counter() - start, result=result)
    try:
      result = run(size, save)
    except Exception:  # the next parts still run; the error is in the JSON
      record(out, part, status="error", seconds=time.perf_counter() - start, error=traceback.format_exc()[-3000:])
      print(f"[gpu.py] {part}: error\n{traceback.format_exc()}", flush=True)
      continue
    record(out, part, status="ok", seconds=time.perf_counter() - start, result=result)
    print(f"[gpu.py] {part}: ok in {time.perf_counter() - start:.1f}s", flush=True)


def worker_env(framework_module: str) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, HERE, env.get("PYTHONPATH")]))
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  env.setdefault("TOKENIZERS_PARALLELISM", "false")
  env.setdefault("HF_HUB_OFFLINE", "1")
  # One device: a forced host device count (the test suite's 8 fake CPUs) would make a mesh of them.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
  return env


def run_worker(parts: list[str], size: str, out: str, timeout: float) -> tuple[str, str]:
  """Runs `parts` in one subprocess (its own process group, killed whole at the timeout)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", ",".join(parts), "--size", size, "--out", out]
  proc = subprocess.Popen(cmd, env=worker_env(PARTS[parts[0]].module), start_new_session=True,
                          stderr=subprocess.PIPE, text=True)
  try:
    _, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    return "timeout", (err or "")[-3000:]
  return ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), (err or "")[-3000:]


# ---- the run -----------------------------------------------------------------------------------

def batches_of(parts: list[str], one_per_part: bool) -> list[list[str]]:
  """The worker processes: one per part, or (toy size: start-up dominates) one per framework in a row."""
  groups: list[list[str]] = []
  for part in parts:
    if groups and not one_per_part and PARTS[groups[-1][0]].module == PARTS[part].module:
      groups[-1].append(part)
    else:
      groups.append([part])
  return groups


def orchestrate(args) -> int:
  parts = list(PARTS) if args.parts == "all" else args.parts.split(",")
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    raise SystemExit(f"--parts: unknown {unknown}; known: {', '.join(PARTS)}")
  one_per_part = args.size != "toy"
  if not one_per_part:  # group a framework's parts together
    parts = sorted(parts, key=lambda p: PARTS[p].module)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  write(args.out, {"size": args.size, "command": " ".join(sys.argv), "git": git_head(), "budget_s": args.budget,
                   "parts": {}})
  start = time.perf_counter()
  for group in batches_of(parts, one_per_part):
    left = args.budget - (time.perf_counter() - start)
    if left < MIN_START_S:
      for part in group:
        record(args.out, part, status="skipped", reason=f"{left:.0f}s of --budget left")
      continue
    limit = min(left, sum(PARTS[p].seconds for p in group) * args.cap_scale)
    print(f"[gpu.py] {','.join(group)} (at most {limit:.0f}s)", flush=True)
    status, err = run_worker(group, args.size, args.out, limit)
    report = read(args.out)
    for part in group:
      entry = report["parts"].get(part, {})
      if entry.get("status") not in ("ok", "error"):  # the worker was killed or crashed during or before it
        record(args.out, part, status=status if status != "ok" else "missing", stderr_tail=err)
        print(f"[gpu.py] {part}: {status}\n{err[-1500:]}", flush=True)
  report = read(args.out)
  report["seconds"] = time.perf_counter() - start
  write(args.out, report)
  print(table(report))
  return 0


def git_head() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


# ---- the README table --------------------------------------------------------------------------

def _get(report: dict, part: str, *keys):
  value = report["parts"].get(part, {}).get("result")
  for key in keys:
    if not isinstance(value, dict) or key not in value:
      return None
    value = value[key]
  return value


def _fmt(value, spec: str, unit: str = "") -> str:
  return "n/a" if value is None else f"{value:{spec}}{unit}"


def _ratio(a, b) -> str:
  return "n/a" if a is None or b is None else f"{a / b:.2f}x"


def table(report: dict) -> str:
  """Markdown tables of one run (what benchmarks/README.md shows)."""
  lines = []
  peak = _get(report, "peaks", "bf16_matmul_tflops")
  read_bw = _get(report, "peaks", "read_bytes_per_s")
  lines += [f"Device: {_get(report, 'peaks', 'env', 'nvidia_smi') or _get(report, 'peaks', 'env', 'devices')}; "
            f"bf16 matmul {_fmt(peak, '.0f', ' TFLOP/s')}, read bandwidth "
            f"{_fmt(read_bw and read_bw / 1e12, '.2f', ' TB/s')}.", ""]
  lines += ["| batch | TTFT ours | TTFT eager | TTFT compile | decode tok/s ours | eager | compile "
            "| TTFT vs eager / compile | decode vs eager / compile |", "|---|---|---|---|---|---|---|---|---|"]
  batches = sorted({int(b) for p in ("gen_ours", "gen_hf", "gen_hf_compile") for b in (_get(report, p, "batches") or {})})
  for b in batches:
    o, e, c = (_get(report, p, "batches", str(b)) or {} for p in ("gen_ours", "gen_hf", "gen_hf_compile"))
    ms = lambda x: _fmt(x.get("ttft_s") and 1e3 * x["ttft_s"], ".1f", " ms")
    tok = lambda x: _fmt(x.get("decode_tok_s"), ".1f")
    lines.append(f"| {b} | {ms(o)} | {ms(e)} | {ms(c)} | {tok(o)} | {tok(e)} | {tok(c)} "
                 f"| {_ratio(e.get('ttft_s'), o.get('ttft_s'))} / {_ratio(c.get('ttft_s'), o.get('ttft_s'))} "
                 f"| {_ratio(o.get('decode_tok_s'), e.get('decode_tok_s'))} / "
                 f"{_ratio(o.get('decode_tok_s'), c.get('decode_tok_s'))} |")
  lines.append("")
  step_bytes = _get(report, "gen_ours", "decode_weight_bytes")
  rows = [(_get(report, "gen_ours", "layout"), _get(report, "gen_ours", "batches", "1"))]
  rows += list((_get(report, "gen_layouts", "layouts") or {}).items())
  lines += ["| inference layout | batch-1 ms/step | weights read / s, % of read bandwidth | first call incl. compile |",
            "|---|---|---|---|"]
  for name, entry in rows:
    if not entry:
      continue
    rate = step_bytes / (entry["ms_per_step"] / 1e3) if step_bytes else None
    lines.append(f"| {name} | {entry['ms_per_step']:.2f} | {_fmt(rate and rate / 1e12, '.2f', ' TB/s')} "
                 f"({_fmt(rate and read_bw and 100 * rate / read_bw, '.0f', '%')}) | "
                 f"{entry['warmup_incl_compile_s']:.1f} s |")
  lines.append("")
  lines += ["| training case | ours s/step | transformers s/step | speedup | ours samples/s "
            "| ours TFLOP/s (MFU) | transformers TFLOP/s (MFU) | peak GB ours / transformers |",
            "|---|---|---|---|---|---|---|---|"]
  cases = list(dict.fromkeys(list(_get(report, "train_ours") or {}) + list(_get(report, "train_hf") or {})))
  for case in cases:
    o, h = _get(report, "train_ours", case) or {}, _get(report, "train_hf", case) or {}
    mfu = lambda x: (f"{_fmt(x.get('model_tflops_per_s'), '.0f')} "
                     f"({_fmt(x.get('model_tflops_per_s') and peak and 100 * x['model_tflops_per_s'] / peak, '.0f', '%')})")
    gb = lambda x: _fmt(x.get("peak_mem_bytes") and x["peak_mem_bytes"] / 1e9, ".1f")
    shape = f"{o.get('layers', '?')} layers, {o.get('batch', '?')} x {o.get('length', '?')}"
    lines.append(f"| {case} ({shape}) | {_fmt(o.get('step_s'), '.3f')} | {_fmt(h.get('step_s'), '.3f')} "
                 f"| {_ratio(h.get('step_s'), o.get('step_s'))} | {_fmt(o.get('samples_per_s'), '.1f')} "
                 f"| {mfu(o)} | {mfu(h)} | {gb(o)} / {gb(h)} |")
  lines.append("")
  p = report["parts"].get("parity", {}).get("result") or {}
  lines.append(f"Parity (tiny, float32, vs transformers on the CPU): max relative logit error "
               f"{_fmt(p.get('max_rel_err_default'), '.1e')} (default precision), "
               f"{_fmt(p.get('max_rel_err_highest'), '.1e')} (highest); greedy tokens identical in every layout: "
               f"{p.get('greedy_identical', 'n/a')}.")
  c = _get(report, "compile") or {}
  compiles = ", ".join(f"{name} {v['compile_s']:.1f} s (+ {v['lower_s']:.1f} s lowering)"
                       for name, v in (c.get("layouts") or {}).items())
  lines.append(f"Compiling the first program of a new {c.get('prompt_tokens', '?')}-token prompt bucket "
               f"({c.get('backend', '?')}): {compiles or 'n/a'}.")
  a = _get(report, "attention") or {}
  kernels = ", ".join(f"{name} {1e3 * sec:.1f} ms ({a['speedup_vs_einsum'][name]:.2f}x; bf16 error "
                      f"{a['errors'][name]['bfloat16']['output']:.1e} / {a['errors'][name]['bfloat16']['grads']:.1e})"
                      for name, sec in (a.get("seconds") or {}).items() if name in a.get("speedup_vs_einsum", {}))
  lines.append(f"Causal attention, forward + gradients, one packed row of {a.get('tokens', '?')} tokens "
               f"({a.get('samples_per_row', '?')} samples; output / gradient error vs float32 einsum): {kernels or 'n/a'}.")
  not_ok = {k: v.get("status") for k, v in report["parts"].items() if v.get("status") != "ok"}
  if not_ok:
    lines.append(f"Parts not finished: {not_ok}.")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", choices=sorted(SIZES), default="7b")
  ap.add_argument("--parts", default="all", help=f"comma-separated, of: {', '.join(PARTS)}")
  ap.add_argument("--out", help="the JSON file (rewritten after every measurement)")
  ap.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 480)")
  ap.add_argument("--cap-scale", type=float, default=None,
                  help="multiplies every part's cap (default 1 at 7b; 10 at toy; e.g. 10 for `compile` on a CPU)")
  ap.add_argument("--table", metavar="FILE.json", help="print the README tables of a finished run and exit")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.table:
    print(table(read(args.table)))
    return 0
  if not args.out:
    ap.error("--out is required")
  if args.cap_scale is None:
    args.cap_scale = 1 if args.size == "7b" else 10
  if args.worker:
    worker(args.worker.split(","), args.size, args.out)
    return 0
  return orchestrate(args)


if __name__ == "__main__":
  sys.exit(main())
