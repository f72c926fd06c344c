"""Yes/no benchmarks: POPE and MME, as LLaVA-1.5 asked and scored them."""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re

from llava_jax.errors import LlavaJaxError
from llava_jax.eval import mme, pope
from llava_jax.eval.tasks.base import (SHORT_ANSWER, Question, Task, export_truth, llava_questions, read_jsonl,
                                       with_suffix)
from llava_jax.eval.tasks.exports import Export


def _export_questions(folder: str, suffix: str, image_name) -> list[Question]:
  """The yes/no questions of an lmms-lab export's test split (question_id, question, image, category, answer):
  asked with `suffix`, the image named image_name(row, question id), category and answer to the scorer."""
  export = Export(folder, (), ("test",))
  out = []
  for i, r in enumerate(export.records):
    qid = str(export.column(r, "question_id", i))
    out.append(Question(qid, with_suffix(export.column(r, "question", i), suffix), export.image(i, image_name(r, qid)),
                        {"category": export.column(r, "category", i), "truth": export.column(r, "answer", i)}))
  return out


class Pope(Task):
  """pope/llava_pope_test.jsonl ({"question_id", "image", "text", "category": random|popular|adversarial}),
  pope/val2014/ (COCO val2014 images), pope/coco/coco_pope_SPLIT.json (one {"label": yes|no} line per
  question of the split, in the question file's order). Prompt: the question + the short-answer suffix.
  Scorer: LLaVA's llava/eval/eval_pope.py per split (the answer rule of llava_jax.eval.pope).
  lmms-lab/POPE (split test): question_id, question, answer, image_source, image, category."""
  name, folder, label, export = "pope", "pope", "POPE", "POPE"
  suffix = SHORT_ANSWER
  reference = "LLaVA llava/eval/eval_pope.py"
  SPLITS = ("random", "popular", "adversarial")

  def read_llava(self, root):
    return llava_questions(self.path(root, "llava_pope_test.jsonl"), self.path(root, "val2014"), self.suffix,
                           ("category",))

  def read_export(self, folder):
    return _export_questions(folder, self.suffix, lambda r, qid: f"{r.get('image_source') or qid}.jpg")

  def score(self, root, questions, answers):
    out, truth = {}, export_truth(questions)
    for split in self.SPLITS:
      asked = [q for q in questions if q.meta.get("category") == split]
      labels = [truth.get(q.qid) for q in asked] if truth else self._labels(root, split, len(asked))
      if labels is None:
        continue
      # Paired by position within the split, as eval_pope.py pairs answers and label lines.
      pairs = [(answers[q.qid], label) for q, label in zip(asked, labels) if q.qid in answers]
      if pairs:
        out[split] = pope.metrics([a for a, _ in pairs], [l for _, l in pairs])
    return out

  def _labels(self, root: str, split: str, asked: int) -> list[str] | None:
    """The labels of coco/coco_pope_SPLIT.json in order (None when absent)."""
    label_file = self.path(root, "coco", f"coco_pope_{split}.json")
    if not os.path.exists(label_file):
      return None
    labels = [row.get("label") for row in read_jsonl(label_file)]
    if asked > len(labels):
      raise LlavaJaxError(f"{label_file}: {len(labels)} labels for {asked} {split} questions")
    return labels

  def headline(self, metrics):
    f1 = [metrics[split]["f1"] for split in self.SPLITS if split in metrics]
    return 100 * sum(f1) / len(f1) if f1 else None  # the LLaVA-1.5 table: F1 averaged over the splits


_MME_FORMAT = re.compile(re.escape(SHORT_ANSWER) + r"|Please answer yes or no\.")


def _mme_key(question: str) -> str:
  """A question as the ground-truth files and LLaVA's question file both spell it: without the answer-format
  instruction, whitespace collapsed (convert_answer_to_mme.py matches them the same way)."""
  return " ".join(_MME_FORMAT.sub(" ", question).split())


def _numbered(questions: list[Question]) -> list[Question]:
  """MME's question_id is the image, shared by its two questions: numbered (ID#1, ID#2) to tell them apart."""
  seen = collections.Counter()
  out = []
  for q in questions:
    seen[q.qid] += 1
    out.append(dataclasses.replace(q, qid=f"{q.qid}#{seen[q.qid]}"))
  return out


class Mme(Task):
  """MME/llava_mme.jsonl ({"question_id": "CATEGORY/FILE", "image", "text", "category"}) and
  MME/MME_Benchmark_release_version/ (the official release: per category the images and "question\\tanswer"
  .txt files, directly or under images/ and questions_answers_YN/). Prompt: the question + the short-answer
  suffix. Scorer: MME's eval_tool/calculation.py (llava_jax.eval.mme), after LLaVA's convert_answer_to_mme.py.
  lmms-lab/MME (split test): question_id ("CATEGORY/FILE"), image, question, answer, category."""
  name, folder, label, export = "mme", "MME", "MME", "MME"
  suffix = SHORT_ANSWER
  reference = "MME eval_tool/calculation.py via LLaVA scripts/convert_answer_to_mme.py"
  RELEASE = "MME_Benchmark_release_version"

  def read_llava(self, root):
    release = self.path(root, self.RELEASE)
    out = []
    for q in llava_questions(self.path(root, "llava_mme.jsonl"), release, self.suffix, ("category",)):
      category = q.meta.get("category") or q.qid.split("/")[0]
      image = q.image
      if image and not os.path.exists(image):  # categories that keep their images under images/
        image = os.path.join(release, category, "images", os.path.basename(image))
      out.append(Question(q.qid, q.text, image, {"category": category}))
    return _numbered(out)

  def read_export(self, folder):
    return _numbered(_export_questions(folder, self.suffix, lambda r, qid: os.path.basename(qid)))

  def _truth(self, root) -> dict[tuple[str, str, str], str]:
    """(category, file stem, question key) -> yes/no, from the release's .txt files."""
    truth = {}
    for path in glob.glob(self.path(root, self.RELEASE, "*", "**", "*.txt"), recursive=True):
      category = os.path.relpath(path, self.path(root, self.RELEASE)).split(os.sep)[0]
      stem = os.path.splitext(os.path.basename(path))[0]
      with open(path, encoding="utf-8") as f:
        for line in f:
          if "\t" in line:
            question, answer = line.rstrip("\n").split("\t")[:2]
            truth[category, stem, _mme_key(question)] = answer.strip()
    return truth

  def score(self, root, questions, answers):
    in_rows = export_truth(questions)
    truth = None if in_rows else self._truth(root)
    if not (in_rows or truth):
      return {}
    records = []
    for q in questions:
      if q.qid not in answers:
        continue
      stem = os.path.splitext(os.path.basename(q.image_file() or q.qid))[0]
      key = (q.meta["category"], stem, _mme_key(q.text))
      if in_rows:
        answer = in_rows[q.qid]
      elif key in truth:
        answer = truth[key]
      else:
        raise LlavaJaxError(f"{self.path(root, self.RELEASE)}: no answer for {q.qid} {key[2]!r}")
      records.append({"category": key[0], "image": stem, "prediction": answers[q.qid], "answer": answer})
    return mme.metrics(records) if records else {}

  def headline(self, metrics):
    return metrics.get("perception")  # the LLaVA-1.5 table reports MME perception
