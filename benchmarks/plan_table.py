"""The smallest fsdp mesh on which LLaVA-1.5 7B/13B stage 1 and 2 fit, per device kind, from `llava-jax plan`.

    python benchmarks/plan_table.py --out results/plan_table.json      # prints the README's markdown table
    python benchmarks/plan_table.py --lora --out results/plan_table_lora.json   # the LoRA memory table

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


def plan(size: str, stage: str, devices: int, folder: str, batch: int = 0, accum: int = 1) -> dict:
  """One plan at remat full; `batch` (0: the recipe's) rows in `accum` accumulation steps."""
  name = f"{size}_{stage}" + (f"_b{batch}_accum{accum}" if batch else "")
  out = os.path.join(folder, f"{name}_fsdp{devices}.json")
  overrides = [f"--config.batch_size={batch}", f"--config.grad_accum_steps={accum}"] if batch else []
  command = [sys.executable, "-m", "llava_jax.cli", "plan", "--config", f"{CONFIG}:stage={stage},size={size}",
             "--config.remat_policy=full", *overrides, "--mesh", f"fsdp={devices}", "--out", out]
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


# --lora: stage 2 with LoRA (bf16 base) and QLoRA (NF4 base) at global batch 16 x 2048, each against its target
# device, on one device at 16, 4 and 1 rows per microbatch (gradient accumulation 1, 4, 16), then, if one row does
# not fit, on the smallest fsdp mesh at one row per device.
LORA_CASES = {("7b", "finetune_lora"): 40 * 10**9, ("7b", "finetune_qlora"): 24 * 10**9,
              ("13b", "finetune_lora"): 40 * 10**9, ("13b", "finetune_qlora"): 24 * 10**9}
LORA_BATCH, LORA_ACCUM = 16, (1, 4, 16)


def lora_search(size: str, stage: str, folder: str) -> list:
  """[(devices, accumulation steps, total bytes)] for one LoRA case, on one device then fsdp meshes."""
  rows, target = [], LORA_CASES[(size, stage)]
  for devices, accums in [(1, LORA_ACCUM)] + [(2 ** k, (LORA_BATCH >> k,)) for k in range(1, 5)]:
    for accum in accums:
      total = plan(size, stage, devices, folder, LORA_BATCH, accum)["per_device_bytes"]["total"]
      print(f"{size} {stage} fsdp={devices} accum={accum}: {total / 1e9:.2f} GB per device", file=sys.stderr,
            flush=True)
      rows.append((devices, accum, total))
    if rows[-1][2] <= target:
      break
  return rows


def lora_markdown(results: dict) -> str:
  lines = ["| model, stage 2 (16 x 2048 tokens) | target | mesh | rows per microbatch x accumulation | per device "
           "| fits |",
           "|---|---|---|---|---|---|"]
  for (size, stage), rows in results.items():
    target = LORA_CASES[(size, stage)]
    kind = "LoRA, bf16 base" if stage == "finetune_lora" else "QLoRA, NF4 base"
    for devices, accum, total in rows:
      lines.append(f"| {size} {kind} | {target / 1e9:.0f} GB | fsdp={devices} | {LORA_BATCH // devices // accum} x "
                   f"{accum} | {total / 1e9:.1f} GB | {'yes' if total <= target else 'no'} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/plan_table.json")
  parser.add_argument("--plans", default="results/plans", help="folder for each plan's JSON")
  parser.add_argument("--lora", action="store_true", help="the LoRA / QLoRA table instead (LORA_CASES)")
  args = parser.parse_args()
  os.makedirs(args.plans, exist_ok=True)
  if args.lora:
    results = {case: lora_search(*case, args.plans) for case in LORA_CASES}
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({f"{size} {stage}": rows for (size, stage), rows in results.items()}, f, indent=2)
    print(lora_markdown(results))
    return
  results = {case: search(*case, args.plans) for case in CASES}
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({f"{size} {stage}": found for (size, stage), found in results.items()}, f, indent=2)
  print(markdown(results))


if __name__ == "__main__":
  main()
