"""The demo's outputs: WORKDIR/results.json (INTERFACE.md's shape), a loss plot, a printed table."""

from __future__ import annotations

import json
import os
import tempfile

from llava_jax.data.instruct_engine import POPE_SPLITS, QA_TYPES

CONTRACT_KEYS = ("accuracy", "blind_accuracy", "pope", "blind_pope", "seconds", "params", "examples")
PHASES = ("data", "stage0", "stage1", "stage2", "eval", "total")
REFERENCE_LABELS = {"one_attribute": "object named by one attribute", "with_size": "object that needs its size"}


def write(workdir: str, results: dict) -> None:
  results = dict(results)
  results["examples"] = list(results.get("examples", [])) + ([results["description"]] if "description" in results else [])
  results["plot"] = plot(results["losses"], os.path.join(workdir, "losses.png"))
  _write_json(results, os.path.join(workdir, "results.json"))
  print(table(results), flush=True)


def _write_json(obj, path: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".results.", suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def plot(losses: dict, path: str) -> str:
  """One panel per phase: CLIP, LM, stage 1, stage 2 loss curves."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  titles = {"clip": "stage 0: CLIP (InfoNCE)", "lm": "stage 0: language model", "stage1": "stage 1: projector",
            "stage2": "stage 2: projector + LM"}
  fig, axes = plt.subplots(1, len(titles), figsize=(4 * len(titles), 3.2))
  for ax, (key, title) in zip(axes, titles.items()):
    curve = losses.get(key) or []
    if curve and not isinstance(curve[0], (list, tuple)):
      curve = [[i + 1, v] for i, v in enumerate(curve)]
    ax.plot([p[0] for p in curve], [p[1] for p in curve])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _pct(x) -> str:
  return f"{100 * x:5.1f}%"


def table(r: dict) -> str:
  lines = ["", "llava-jax demo: miniature LLaVA on held-out ShapesWorld images", "",
           f"{'question type':<16}{'with image':>12}{'blind':>10}"]
  for t in QA_TYPES:
    lines.append(f"{t:<16}{_pct(r['accuracy'][t]):>12}{_pct(r['blind_accuracy'][t]):>10}")
  if "headline" in r:
    h = r["headline"]
    lines.append(f"{'color+shape+exist':<16}{_pct(h['accuracy']):>12}{_pct(h['blind_accuracy']):>10}")
  for qtype, groups in r.get("accuracy_by_reference", {}).items():
    lines.append(f"  {qtype}: " + ", ".join(f"{REFERENCE_LABELS[name]} {_pct(g['accuracy']).strip()} ({g['count']} questions)"
                                           for name, g in groups.items()))
  lines += ["", f"{'POPE':<13}{'acc':>8}{'prec':>8}{'recall':>8}{'F1':>8}{'yes':>8}{'blind F1':>10}"]
  for split in POPE_SPLITS:
    m, b = r["pope"][split], r["blind_pope"][split]
    lines.append(f"{split:<13}" + "".join(f"{m[k]:8.3f}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
                 + f"{b['f1']:10.3f}")
  if "eval" in r:  # the same answers, scored by llava-jax eval's POPE and GQA scorers
    from llava_jax.eval.tasks import TASKS  # pylint: disable=import-outside-toplevel
    headline = {task: TASKS[task].headline(metrics) for task, metrics in r["eval"].items()}
    lines += ["", "llava-jax eval (exact-match GQA scorer): " + ", ".join(
        f"{TASKS[task].label} {value:.1f}" for task, value in headline.items() if value is not None)]
  lines += ["", "seconds: " + ", ".join(f"{k} {r['seconds'].get(k, 0):.0f}" for k in PHASES),
            "params:  " + ", ".join(f"{k} {v:,}" for k, v in r["params"].items()), ""]
  for ex in r["examples"]:
    lines.append(f"[{ex['qtype']}] {os.path.basename(ex['image'])}  Q: {ex['question']}")
    lines.append(f"    model: {ex['answer']}")
    lines.append(f"    truth: {ex['truth']}")
  if r.get("export"):
    lines += ["", f"model folder: {r['export']}  (try: llava-jax chat --model {r['export']} --image IMG)"]
  return "\n".join(lines)
