"""The demo's held-out questions as benchmark folders, scored by `llava-jax eval`'s code.

The POPE probes become a POPE folder and the short-answer questions a GQA-style one, both in LLaVA's
evaluation layout (their images: the demo's image folder, linked). The demo's own answers are written as
eval's answers files, so `llava-jax eval` resumes with nothing to ask and scores them with its POPE and GQA
scorers; `llava-jax eval --no-answer-format` on the same folders asks the model anew and scores the same.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from llava_jax.data import instruct_engine
from llava_jax.fileio import atomic_file

TASKS = "pope,gqa"


def _jsonl(rows: Sequence[dict], path: str) -> None:
  with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def _link(target: str, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if os.path.islink(path):
    os.unlink(path)
  os.symlink(os.path.abspath(target), path)


def pope_questions(sets: dict[str, list[dict]]) -> list[dict]:
  """The POPE questions of every split, in the order of the folder's question file."""
  return [q for split in instruct_engine.POPE_SPLITS for q in sets[f"pope_{split}"]]


def write(sets: dict[str, list[dict]], image_folder: str, root: str) -> str:
  """ROOT/pope (llava_pope_test.jsonl, val2014/, coco/coco_pope_SPLIT.json) and ROOT/gqa
  (llava_gqa_testdev_balanced.jsonl, data/images/, data/testdev_balanced_questions.json); returns root."""
  pope = pope_questions(sets)
  _jsonl([{"question_id": q["id"], "image": q["image"], "text": q["question"], "category": q["split"]} for q in pope],
         os.path.join(root, "pope", "llava_pope_test.jsonl"))
  for split in instruct_engine.POPE_SPLITS:
    _jsonl([{"label": q["answer"]} for q in sets[f"pope_{split}"]],
           os.path.join(root, "pope", "coco", f"coco_pope_{split}.json"))
  _link(image_folder, os.path.join(root, "pope", "val2014"))
  qa = sets["qa"]
  _jsonl([{"question_id": q["id"], "image": q["image"], "text": q["question"]} for q in qa],
         os.path.join(root, "gqa", "llava_gqa_testdev_balanced.jsonl"))
  with atomic_file(os.path.join(root, "gqa", "data", "testdev_balanced_questions.json")) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({q["id"]: {"answer": q["answer"]} for q in qa}, f)
  _link(image_folder, os.path.join(root, "gqa", "data", "images"))
  return root


def score(model: str, sets: dict[str, list[dict]], answers: dict[str, list[str]], image_folder: str,
          root: str, max_new_tokens: int) -> dict:
  """`llava-jax eval`'s POPE and GQA results on the demo's answers (`answers[name]`: the replies to
  `sets[name]`), written under ROOT/data and ROOT/out."""
  from llava_jax.eval import runner
  from llava_jax.eval.answers import AnswersFile
  data, out = write(sets, image_folder, os.path.join(root, "data")), os.path.join(root, "out")
  model_id = os.path.realpath(model)
  given = {"pope": [(q, a) for name in (f"pope_{s}" for s in instruct_engine.POPE_SPLITS)
                    for q, a in zip(sets[name], answers[name])],
           "gqa": list(zip(sets["qa"], answers["qa"]))}
  for task, rows in given.items():
    answers_file = AnswersFile(os.path.join(out, task, "answers.jsonl"), task, model_id)
    if os.path.exists(answers_file.path):
      os.unlink(answers_file.path)  # a rerun of the demo's evaluation: its answers replace the last ones
    answers_file.append([(q["id"], q["question"], a) for q, a in rows])
  results = runner.eval_command(model, TASKS, data, out, batch_size=64, max_new_tokens=max_new_tokens,
                                answer_format=False)
  return {task: results[task] for task in TASKS.split(",")}
