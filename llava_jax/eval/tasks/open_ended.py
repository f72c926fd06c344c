"""Open-ended benchmarks judged by a GPT model: LLaVA-Bench (in-the-wild) and MM-Vet. Only the answers are
written here (and MM-Vet's submission file); judging is left to the official scripts or server."""

from __future__ import annotations

import os

from llava_jax.eval.tasks.base import Task, llava_questions
from llava_jax.fileio import write_json_atomic


class LlavaBench(Task):
  """llava-bench-in-the-wild/questions.jsonl, llava-bench-in-the-wild/images/. Prompt: the question as is
  (no suffix), up to 1024 new tokens (LLaVA's model_vqa.py). Judge: LLaVA's llava/eval/eval_gpt_review_bench.py
  on TASK/answers.jsonl (its "text" field)."""
  name, folder, label = "llava_bench", "llava-bench-in-the-wild", "LLaVA-W"
  reference = "LLaVA llava/eval/eval_gpt_review_bench.py (GPT-4 judge; not run here)"
  max_new_tokens = 1024

  def questions(self, root):
    return llava_questions(self.path(root, "questions.jsonl"), self.path(root, "images"), None)

  def score(self, root, questions, answers):
    return {}


class MmVet(Task):
  """mm-vet/llava-mm-vet.jsonl, mm-vet/images/. Prompt: the question as is, up to 1024 new tokens. Writes
  TASK/submission.json ({question_id: answer}) as LLaVA's scripts/convert_mmvet_for_eval.py, for MM-Vet's
  GPT-4 grader."""
  name, folder, label = "mm_vet", "mm-vet", "MM-Vet"
  reference = "LLaVA scripts/convert_mmvet_for_eval.py + MM-Vet's grader (not run here)"
  max_new_tokens = 1024

  def questions(self, root):
    return llava_questions(self.path(root, "llava-mm-vet.jsonl"), self.path(root, "images"), None)

  def score(self, root, questions, answers):
    return {}

  def write_submission(self, questions, answers, out_dir):
    path = os.path.join(out_dir, "submission.json")
    write_json_atomic({q.qid: answers[q.qid] for q in questions if q.qid in answers}, path)
    return path
