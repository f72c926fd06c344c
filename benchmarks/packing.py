"""Packed vs unpacked training on the CPU, side by side in ONE run: packing efficiency (real tokens / row slots)
and real tokens per second of the tiny config on a small captioning world (tests/train_fixtures.py: image captions
and text-only questions of a few lengths, template `plain`).

    .venv/bin/python benchmarks/packing.py [--steps 12] [--batch 4] [--max-len 128] [--out FILE.json]

Each setting trains in its own process (`llava-jax train`); the rates are over the logged steps after the first
(which compiles), from WORKDIR/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import train_fixtures as F  # pylint: disable=wrong-import-position


def records():
  questions = ["What is in the image?", "Describe it briefly.", "What is in the image? Describe it briefly."]
  text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "A red star."}]}
          for i, q in enumerate(questions)]
  return F.caption_records(16) + text * 3


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--max-len", type=int, default=128)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="packing_bench_")
  os.makedirs(os.path.join(root, "world"))
  world = F.make_world(os.path.join(root, "world"), records())
  results = {}
  for packing in (False, True):
    workdir = os.path.join(root, f"packing_{packing}")
    argv = F.train_args(world, workdir, stage="finetune", total_steps=args.steps, batch_size=args.batch,
                        checkpoint_every=0, **{"data.max_len": args.max_len, "data.buckets": f"({args.max_len // 2},)",
                                               "data.template": "plain", "data.packing": packing})
    F.cli(argv, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}, check=True)
    steady = F.read_metrics(workdir)[1:]
    results[f"packing={packing}"] = {
        "packing_efficiency": sum(r["packing_efficiency"] for r in steady) / len(steady),
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady)}
  for name, r in results.items():
    print(f"{name:14s} packing efficiency {r['packing_efficiency']:.3f}  real tokens/s {r['tokens_per_s']:.0f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
