"""Generation speed, side by side in ONE run: llava-jax's engine vs transformers (eager, torch.compile).

    .venv/bin/python benchmarks/generate.py --out results/generate.json

Model (random weights, float32, built in-process; nothing is downloaded):
  vision  CLIP-like ViT, 336 px, patch 14 -> 576 image tokens; hidden 768, 4 layers, 12 heads,
          MLP 3072 (ViT-B width, shallow so the run fits in minutes); feature layer -2, "default"
  proj    mlp2x_gelu 768 -> 768 -> 768
  text    LLaMA, hidden 768, 12 layers, 12 heads (MHA), MLP 2048, vocab 32000, untied:
          110M parameters read per decode step (85M in the layers + 24.6M lm_head)
Prompt: BOS + 576 image tokens + 31 text tokens = 608 tokens per row, one image per row.

Measured (greedy, EOS disabled so every row produces exactly N tokens):
  - time to first token (TTFT): a whole `generate(max_new_tokens=1)` call (vision + prefill +
    first token, host to host);
  - decode tokens/s: (batch x N) / (T(1 + N) - T(1)), i.e. the prefill is subtracted;
  - peak memory: the process RSS sampled every millisecond during a call, minus the RSS before.
Every system is warmed up first (ours: XLA compile of each program; compile: torch.compile of
the decode step), so compile time is EXCLUDED from every figure. The systems are run
interleaved, round by round, and each figure is the best over rounds: other jobs share this
machine, and the minimum is the least disturbed measurement.

The same run measures the two ceilings (benchmarks/ceilings.py) before and after the systems
(the best is kept) and reports prefill as FLOPs / peak matmul FLOP/s and batch-1 decode as
(weight bytes read per token / matrix-vector bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ceilings  # noqa: E402

IMAGE_TOKEN = 31999
TEXT_TOKENS = 31  # + BOS + 576 image tokens = 608


# ---- the model -------------------------------------------------------------------------------

def hf_config(args):
  import transformers
  vision = transformers.CLIPVisionConfig(
      hidden_size=768, intermediate_size=3072, num_hidden_layers=args.vision_layers, num_attention_heads=12,
      image_size=336, patch_size=14, projection_dim=768)
  text = transformers.LlamaConfig(
      vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
      num_key_value_heads=12, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1,
      eos_token_id=2, pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
  return transformers.LlavaConfig(
      vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=576,
      projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
      tie_word_embeddings=False)


def build_models(args):
  import torch
  import transformers
  from safetensors.numpy import load_file

  from llava_jax.config import LlavaConfig
  from llava_jax.weights import mapping

  torch.manual_seed(0)
  hf = transformers.LlavaForConditionalGeneration(hf_config(args)).eval()
  gc = hf.generation_config
  gc.eos_token_id = None  # EOS disabled: every row produces exactly max_new_tokens
  gc.pad_token_id = 0
  gc.do_sample = False
  config = LlavaConfig.from_hf_dict(hf.config.to_dict())
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    state = load_file(os.path.join(d, "model.safetensors"))
  params = mapping.hf_to_params(state.__getitem__, config)
  del state
  return hf, config, params


def make_inputs(batch: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(batch):
    ids = np.concatenate([[1], np.full(576, IMAGE_TOKEN), rng.integers(3, 31000, TEXT_TOKENS)]).astype(np.int32)
    rows.append(ids)
  ids = np.stack(rows)
  pixels = rng.standard_normal((batch, 3, 336, 336)).astype(np.float32)  # NCHW, one image per row
  return ids, pixels


# ---- FLOPs and bytes (analytic) --------------------------------------------------------------

def model_counts(config, prompt_len: int, slots: int) -> dict:
  v, t = config.vision, config.text
  n_img = v.num_patches + 1
  dv, iv = v.hidden_size, v.intermediate_size
  vision = 2 * v.num_patches * (v.num_channels * v.patch_size ** 2) * dv
  vision += v.num_hidden_layers * (2 * n_img * (4 * dv * dv + 2 * dv * iv) + 4 * n_img * n_img * dv)
  projector = 2 * config.image_seq_length * (config.vision_feature_size * t.hidden_size + t.hidden_size ** 2)
  d, kvd = t.hidden_size, t.num_key_value_heads * t.head_dim
  qd = t.num_attention_heads * t.head_dim
  layer_params = d * qd * 2 + d * kvd * 2 + 3 * d * t.intermediate_size + 2 * d
  s = prompt_len
  causal_pairs = s * (s + 1) / 2
  text = t.num_hidden_layers * (2 * s * (layer_params - 2 * d) + 2 * 2 * causal_pairs * qd)
  head = 2 * d * t.vocab_size  # logits for the last position only
  decode_weights = t.num_hidden_layers * layer_params + d + d * t.vocab_size  # + one embedding row
  decode_weight_bytes = 4 * (decode_weights + d)
  kv_bytes = 4 * 2 * t.num_hidden_layers * slots * kvd
  return {
      "prefill_flops_per_row": vision + projector + text + head,
      "prefill_flops_parts": {"vision": vision, "projector": projector, "text": text, "lm_head_last": head},
      "prefill_flops_if_all_positions_get_logits": vision + projector + text + head * s,
      "decode_weight_params": decode_weights,
      "decode_weight_bytes_per_step": decode_weight_bytes,
      "kv_bytes_per_step_at_slots": kv_bytes,
      "kv_slots_assumed": slots,
  }


# ---- memory ----------------------------------------------------------------------------------

class PeakRss:
  """Samples this process's RSS every millisecond while active; .delta = peak - start (bytes)."""

  def __init__(self):
    import psutil
    self._proc = psutil.Process()
    self.delta = 0

  def __enter__(self):
    self._start = self._proc.memory_info().rss
    self._peak = self._start
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop.is_set():
      self._peak = max(self._peak, self._proc.memory_info().rss)
      time.sleep(0.001)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self._peak = max(self._peak, self._proc.memory_info().rss)
    self.delta = self._peak - self._start


# ---- the systems -----------------------------------------------------------------------------

class Ours:
  name = "ours"

  def __init__(self, config, params):
    from llava_jax.infer.generate import Engine
    self.engine = Engine(config, params, eos_token_ids=())

  def run(self, ids, pixels, new_tokens):
    from llava_jax.infer.generate import Prompt
    nhwc = pixels.transpose(0, 2, 3, 1)
    prompts = [Prompt(ids[i], nhwc[i:i + 1]) for i in range(len(ids))]
    out = self.engine.generate(prompts, new_tokens)
    return np.stack([c.tokens for c in out])


class Transformers:
  def __init__(self, hf, compiled: bool):
    import torch
    self.hf, self.compiled, self.torch = hf, compiled, torch
    self.name = "torch_compile" if compiled else "torch_eager"
    self.kwargs = {}
    if compiled:
      from transformers import CompileConfig
      # transformers' own recipe: a static cache, and generate compiles the decode step with
      # torch.compile (inductor). _compile_all_devices lets it do so on CPU; "reduce-overhead"
      # means CUDA graphs, which do not exist on CPU, so mode "default". Prefill stays eager.
      compile_config = CompileConfig(mode="default", fullgraph=False)
      compile_config._compile_all_devices = True
      self.kwargs = dict(cache_implementation="static", compile_config=compile_config)

  def run(self, ids, pixels, new_tokens):
    torch = self.torch
    with torch.inference_mode():
      out = self.hf.generate(
          input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=torch.from_numpy(pixels),
          attention_mask=torch.ones(ids.shape, dtype=torch.long), max_new_tokens=new_tokens,
          do_sample=False, **self.kwargs)
    return out[:, ids.shape[1]:].numpy()


# ---- the run ---------------------------------------------------------------------------------

def timed(fn, *a):
  t = time.perf_counter()
  out = fn(*a)
  return time.perf_counter() - t, out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="JSON file for every number")
  ap.add_argument("--new-tokens", type=int, default=64, help="decode tokens per row (default 64)")
  ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept (default 3)")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--vision-layers", type=int, default=4)
  ap.add_argument("--ceiling-passes", type=int, default=2, help="ceiling measurements: 2 = before and after")
  ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile system")
  ap.add_argument("--systems", default="ours,torch_eager,torch_compile")
  args = ap.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  n = args.new_tokens

  import jax
  import torch
  import transformers

  report: dict = {
      "command": " ".join([os.path.basename(sys.executable), "benchmarks/generate.py"] + sys.argv[1:]),
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                  "loadavg_start": os.getloadavg(), "torch_threads": torch.get_num_threads(),
                  "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                  "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision)},
      "git": _git_state(),
      "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
      "settings": {"new_tokens": n, "rounds": args.rounds, "batches": batches, "prompt_tokens": 1 + 576 + TEXT_TOKENS,
                   "dtype": "float32", "greedy": True, "eos": "disabled"},
  }
  ceil = []
  if args.ceiling_passes >= 1:
    print("ceilings (first pass) ...", flush=True)
    ceil.append(ceilings.measure())

  print("building the model ...", flush=True)
  hf, config, params = build_models(args)
  n_params = sum(p.numel() for p in hf.parameters())
  n_text = sum(p.numel() for p in hf.model.language_model.parameters()) + hf.lm_head.weight.numel()
  report["model"] = {"params_total": n_params, "params_text_with_lm_head": n_text,
                     "vision": {"hidden": 768, "layers": args.vision_layers, "heads": 12, "mlp": 3072,
                                "image": 336, "patch": 14, "image_tokens": 576},
                     "text": {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 12, "mlp": 2048, "vocab": 32000}}

  wanted = args.systems.split(",")
  systems = []
  skipped = {}
  if "ours" in wanted:
    systems.append(Ours(config, params))
  if "torch_eager" in wanted:
    systems.append(Transformers(hf, compiled=False))
  if "torch_compile" in wanted:
    if args.no_compile:
      skipped["torch_compile"] = "--no-compile"
    else:
      systems.append(Transformers(hf, compiled=True))

  inputs = {b: make_inputs(b) for b in batches}
  tokens_out: dict = {}
  warm: dict = {}
  report["warmup_seconds_incl_compile"] = warm
  report["skipped"] = skipped
  times = {(s.name, b, k): [] for s in systems for b in batches for k in (1, 1 + n)}
  mem = {(s.name, b): 0 for s in systems for b in batches}
  from llava_jax.infer.generate import bucket_length
  prompt_len = 1 + 576 + TEXT_TOKENS
  same_program = bucket_length(bucket_length(prompt_len) + 1) == bucket_length(bucket_length(prompt_len) + 1 + n)
  done_batches = []
  for b in batches:  # batch by batch, so a partial run still leaves complete figures in --out
    ids, px = inputs[b]
    # Warm-up: compile every program each system will run (ours: one program per batch and
    # cache bucket; torch.compile: the decode step per batch and cache length). Never timed.
    for s in list(systems):
      lengths = {"ours": [1 + n] + ([] if same_program else [1]), "torch_eager": [1],
                 "torch_compile": [1, 1 + n]}[s.name]
      try:
        t0 = time.perf_counter()
        for k in lengths:
          s.run(ids, px, k)
        warm[f"{s.name}/b{b}"] = time.perf_counter() - t0
        print(f"warm-up {s.name} batch {b}: {warm[f'{s.name}/b{b}']:.1f}s", flush=True)
      except Exception as e:  # torch.compile may not work on a given machine: skip it cleanly
        if s.name != "torch_compile":
          raise
        skipped[s.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"skipping {s.name}: {skipped[s.name]}", flush=True)
        traceback.print_exc(limit=3)
        systems.remove(s)
    for r in range(args.rounds):
      for s in systems:
        for k in (1, 1 + n):
          with PeakRss() as m:
            dt, toks = timed(s.run, ids, px, k)
          times[(s.name, b, k)].append(dt)
          mem[(s.name, b)] = max(mem[(s.name, b)], m.delta)
          if k > 1:
            tokens_out[(s.name, b)] = toks
          print(f"round {r} batch {b} {s.name:14s} new={k:4d}: {dt:7.3f}s", flush=True)
    done_batches.append(b)
    if b != batches[-1]:
      summarize(report, systems, done_batches, times, mem, tokens_out, ceil, config, n, args, partial=True)
  summarize(report, systems, done_batches, times, mem, tokens_out, ceil, config, n, args, partial=False)
  return 0


def summarize(report, systems, batches, times, mem, tokens_out, ceil, config, n, args, partial: bool) -> None:
  if args.ceiling_passes >= 2 and not partial:
    print("ceilings (second pass) ...", flush=True)
    ceil.append(ceilings.measure())
  flops = max([c["matmul_flops"]["best"] for c in ceil], default=float("nan"))
  bw = max([c["matvec_bandwidth"]["best"] for c in ceil], default=float("nan"))
  report["ceilings"] = {"matmul_flops_per_s": flops, "matvec_bytes_per_s": bw, "passes": ceil}

  from llava_jax.infer.generate import bucket_length
  prompt_len = 1 + 576 + TEXT_TOKENS
  report["partial"] = partial
  slots = bucket_length(bucket_length(prompt_len) + 1 + n)
  counts = model_counts(config, prompt_len, slots)
  report["counts"] = counts
  bound_b1 = bw / counts["decode_weight_bytes_per_step"]
  bound_b1_kv = bw / (counts["decode_weight_bytes_per_step"] + counts["kv_bytes_per_step_at_slots"])

  results: dict = {}
  for s in systems:
    for b in batches:
      t1, tn = min(times[(s.name, b, 1)]), min(times[(s.name, b, 1 + n)])
      decode_s = tn - t1
      e = {
          "ttft_s": t1, "ttft_s_all": times[(s.name, b, 1)],
          "generate_s": tn, "generate_s_all": times[(s.name, b, 1 + n)],
          "decode_s": decode_s,
          "decode_tokens_per_s": b * n / decode_s if decode_s > 0 else float("nan"),
          "decode_steps_per_s": n / decode_s if decode_s > 0 else float("nan"),
          "decode_ms_per_step": 1e3 * decode_s / n,
          "peak_rss_delta_bytes": mem[(s.name, b)],
          "prefill_flops": b * counts["prefill_flops_per_row"],
          "prefill_fraction_of_peak_flops": b * counts["prefill_flops_per_row"] / t1 / flops,
      }
      if b == 1:
        e["decode_fraction_of_bandwidth_bound"] = e["decode_steps_per_s"] / bound_b1
        e["decode_fraction_of_bandwidth_bound_incl_kv"] = e["decode_steps_per_s"] / bound_b1_kv
      results.setdefault(s.name, {})[f"batch{b}"] = e
  report["results"] = results
  report["bounds"] = {"decode_b1_tokens_per_s_weights": bound_b1, "decode_b1_tokens_per_s_weights_and_kv": bound_b1_kv}

  ratios: dict = {}
  if "ours" in results:
    for other in ("torch_eager", "torch_compile"):
      if other not in results:
        continue
      for b in batches:
        o, t = results["ours"][f"batch{b}"], results[other][f"batch{b}"]
        ratios[f"vs_{other}/batch{b}"] = {"ttft_speedup": t["ttft_s"] / o["ttft_s"],
                                          "decode_speedup": o["decode_tokens_per_s"] / t["decode_tokens_per_s"]}
    agree = {}
    for b in batches:
      if ("ours", b) in tokens_out and ("torch_eager", b) in tokens_out:
        a, r = tokens_out[("ours", b)], tokens_out[("torch_eager", b)]
        same_prefix = [int(np.argmax(np.concatenate([x != y, [True]]))) for x, y in zip(a, r)]
        agree[f"batch{b}"] = {"identical_rows": int(sum(np.array_equal(x, y) for x, y in zip(a, r))),
                              "rows": len(a), "first_divergence_per_row": same_prefix}
    report["greedy_agreement_with_eager"] = agree
  report["ratios"] = ratios
  targets = {}
  if "ours" in results and "torch_eager" in results:
    o, e = results["ours"], results["torch_eager"]
    c = results.get("torch_compile")
    if "batch1" in o:
      targets["b1_decode_>=90%_bandwidth_bound"] = o["batch1"]["decode_fraction_of_bandwidth_bound"] >= 0.9
      targets["b1_decode_ahead_of_eager"] = o["batch1"]["decode_tokens_per_s"] > e["batch1"]["decode_tokens_per_s"]
      targets["ttft_>=1.2x_eager"] = e["batch1"]["ttft_s"] / o["batch1"]["ttft_s"] >= 1.2
      if c:
        targets["b1_decode_ahead_of_compile"] = o["batch1"]["decode_tokens_per_s"] > c["batch1"]["decode_tokens_per_s"]
        targets["ttft_ahead_of_compile"] = o["batch1"]["ttft_s"] < c["batch1"]["ttft_s"]
    if "batch8" in o:
      targets["b8_decode_>=2.5x_eager"] = o["batch8"]["decode_tokens_per_s"] >= 2.5 * e["batch8"]["decode_tokens_per_s"]
      if c:
        targets["b8_decode_ahead_of_compile"] = o["batch8"]["decode_tokens_per_s"] > c["batch8"]["decode_tokens_per_s"]
  report["targets_met"] = targets
  report["machine"]["loadavg_end"] = os.getloadavg()
  report["machine"]["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

  print_table(report, batches)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2, default=float)
  print(f"wrote {args.out}")


def _git_state() -> dict:
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()
  try:
    return {"head": run("rev-parse", "--short", "HEAD"),
            "dirty_files": run("status", "--porcelain", "--untracked-files=no").splitlines()}
  except OSError:
    return {}


def print_table(report: dict, batches) -> None:
  c = report["ceilings"]
  print()
  print(f"ceilings: matmul {c['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, "
        f"matvec {c['matvec_bytes_per_s'] / 1e9:.2f} GB/s -> batch-1 decode bound "
        f"{report['bounds']['decode_b1_tokens_per_s_weights']:.1f} tok/s "
        f"({report['counts']['decode_weight_bytes_per_step'] / 1e6:.0f} MB weights/step)")
  head = f"{'system':14s} {'batch':>5s} {'TTFT s':>8s} {'decode tok/s':>13s} {'ms/step':>8s} {'peak RSS MB':>12s} " \
         f"{'prefill %FLOP':>13s} {'decode %BW':>10s}"
  print(head)
  print("-" * len(head))
  for name, per in report["results"].items():
    for b in batches:
      e = per[f"batch{b}"]
      bwf = e.get("decode_fraction_of_bandwidth_bound")
      print(f"{name:14s} {b:5d} {e['ttft_s']:8.3f} {e['decode_tokens_per_s']:13.1f} {e['decode_ms_per_step']:8.1f} "
            f"{e['peak_rss_delta_bytes'] / 2**20:12.0f} {100 * e['prefill_fraction_of_peak_flops']:12.0f}% "
            f"{'' if bwf is None else f'{100 * bwf:9.0f}%'}")
  for k, v in report["ratios"].items():
    print(f"ours {k}: TTFT {v['ttft_speedup']:.2f}x, decode {v['decode_speedup']:.2f}x")
  for k, v in report.get("skipped", {}).items():
    print(f"skipped {k}: {v}")
  print("targets:", json.dumps(report.get("targets_met", {})))
  print("greedy agreement with eager:", json.dumps(report.get("greedy_agreement_with_eager", {})))


if __name__ == "__main__":
  sys.exit(main())
