"""Open-ended benchmarks judged by a GPT model: LLaVA-Bench (in-the-wild) and MM-Vet. Only the answers are
written here (and MM-Vet's submission file); judging is left to the official scripts or server."""

from __future__ import annotations

import os

from llava_jax.eval.tasks.base import Question, Task, llava_questions
from llava_jax.eval.tasks.exports import Export
from llava_jax.fileio import write_json_atomic


def _plain_questions(export: Export) -> list[Question]:
  """An export's questions asked as they are (no suffix), as LLaVA's model_vqa.py asks them."""
  out = []
  for i, r in enumerate(export.records):
    qid = str(export.column(r, "question_id", i))
    out.append(Question(qid, export.column(r, "question", i), export.image(i, f"{qid}.jpg")))
  return out


class LlavaBench(Task):
  """llava-bench-in-the-wild/questions.jsonl, llava-bench-in-the-wild/images/. Prompt: the question as is
  (no suffix), up to 1024 new tokens (LLaVA's model_vqa.py). Judge: LLaVA's llava/eval/eval_gpt_review_bench.py
  on TASK/answers.jsonl (its "text" field). lmms-lab/llava-bench-in-the-wild (split train): question_id,
  question, image."""
  name, folder, label, export = "llava_bench", "llava-bench-in-the-wild", "LLaVA-W", "llava-bench-in-the-wild"
  reference = "LLaVA llava/eval/eval_gpt_review_bench.py (GPT-4 judge; not run here)"
  max_new_tokens = 1024

  def read_export(self, folder):
    return _plain_questions(Export(folder, (), ("train",)))

  def read_llava(self, root):
    return llava_questions(self.path(root, "questions.jsonl"), self.path(root, "images"), None)

  def score(self, root, questions, answers):
    return {}


class MmVet(Task):
  """mm-vet/llava-mm-vet.jsonl, mm-vet/images/. Prompt: the question as is, up to 1024 new tokens. Writes
  TASK/submission.json ({question_id: answer}) as LLaVA's scripts/convert_mmvet_for_eval.py, for MM-Vet's
  GPT-4 grader. lmms-lab/MMVet (split test): question_id, question, image."""
  name, folder, label, export = "mm_vet", "mm-vet", "MM-Vet", "MMVet"
  reference = "LLaVA scripts/convert_mmvet_for_eval.py + MM-Vet's grader (not run here)"
  max_new_tokens = 1024

  def read_export(self, folder):
    return _plain_questions(Export(folder, (), ("test",)))

  def read_llava(self, root):
    return llava_questions(self.path(root, "llava-mm-vet.jsonl"), self.path(root, "images"), None)

  def score(self, root, questions, answers):
    return {}

  def write_submission(self, questions, answers, out_dir):
    path = os.path.join(out_dir, "submission.json")
    write_json_atomic({q.qid: answers[q.qid] for q in questions if q.qid in answers}, path)
    return path
