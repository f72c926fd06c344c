"""The smallest fsdp mesh on which LLaVA-1.5 7B/13B stage 1 and 2 fit, per device kind, from `llava-jax plan`.

    python benchmarks/plan_table.py --out results/plan_table.json      # prints the README's markdown table

Each case is the recipe of configs/llava_v1_5.py (global batch 256 / 128, sequence length data.max_len 2048,
no gradient accumulation) with remat `full`, the setting `plan` was checked against on a GPU. Meshes are
fsdp-only, of 1, 2, 4, ... devices, until the smallest device kind fits or a device holds one row. Each
plan is a process of its own (its own fake devices); its JSON lands in --plans.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIG = "configs/llava_v1_5.py"
CASES = [("7b", "pretrain"), ("7b", "finetune"), ("13b", "pretrain"), ("13b", "finetune")]
DEVICE_KINDS = {"TPU v5e (16 GiB)": 16 * 2**30, "TPU v5p (95 GiB)": 95 * 2**30, "80 GB GPU": 80 * 10**9}
BATCH = {"pretrain": 256, "finetune": 128}


def plan(size: str, stage: str, devices: int, folder: str) -> dict:
  out = os.path.join(folder, f"{size}_{stage}_fsdp{devices}.json")
  command = [sys.executable, "-m", "llava_jax.cli", "plan", "--config", f"{CONFIG}:stage={stage},size={size}",
             "--config.remat_policy=full", "--mesh", f"fsdp={devices}", "--out", out]
  subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
  with open(out, encoding="utf-8") as f:
    return json.load(f)


def search(size: str, stage: str, folder: str) -> dict:
  """{device kind: (devices, total bytes) of the smallest fitting mesh or None}, and every plan's total."""
  smallest, totals = dict.fromkeys(DEVICE_KINDS), {}
  devices = 1
  while devices <= BATCH[stage]:
    report = plan(size, stage, devices, folder)
    total = report["per_device_bytes"]["total"]
    totals[devices] = total
    print(f"{size} {stage} fsdp={devices}: {total / 1e9:.2f} GB per device", file=sys.stderr, flush=True)
    for kind, memory in DEVICE_KINDS.items():
      if smallest[kind] is None and total <= memory:
        smallest[kind] = (devices, total)
    if all(smallest.values()):
      break
    devices *= 2
  return {"smallest": smallest, "totals": totals}


def markdown(results: dict) -> str:
  lines = ["| model, stage (global batch x 2048 tokens) | " + " | ".join(DEVICE_KINDS) + " |",
           "|---|" + "---|" * len(DEVICE_KINDS)]
  for (size, stage), found in results.items():
    cells = []
    for kind in DEVICE_KINDS:
      hit = found["smallest"][kind]
      cells.append(f"fsdp={hit[0]} ({hit[1] / 1e9:.1f} GB)" if hit else "does not fit at 1 row per device")
    lines.append(f"| {size} {'stage 1' if stage == 'pretrain' else 'stage 2'} ({BATCH[stage]}) | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/plan_table.json")
  parser.add_argument("--plans", default="results/plans", help="folder for each plan's JSON")
  args = parser.parse_args()
  os.makedirs(args.plans, exist_ok=True)
  results = {case: search(*case, args.plans) for case in CASES}
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({f"{size} {stage}": found for (size, stage), found in results.items()}, f, indent=2)
  print(markdown(results))


if __name__ == "__main__":
  main()
