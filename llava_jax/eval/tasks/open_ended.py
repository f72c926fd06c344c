"""Open-ended benchmarks judged by a GPT model: LLaVA-Bench (in-the-wild) and MM-Vet. The answers are always
written (and MM-Vet's submission file); with --judge-url they are also judged (llava_jax/eval/judge.py) by the
official prompts (llava_jax/eval/judge_prompts.py) and scored as the official scripts do."""

from __future__ import annotations

import os
import statistics

from llava_jax.errors import LlavaJaxError
from llava_jax.eval import judge_prompts as prompts
from llava_jax.eval.judge import JudgedTask, JudgeRequest
from llava_jax.eval.tasks.base import Question, Task, field, llava_questions, read_jsonl
from llava_jax.eval.tasks.exports import Export
from llava_jax.fileio import read_json, write_json_atomic


def _plain_questions(export: Export, meta_columns: dict[str, str]) -> list[Question]:
  """An export's questions asked as they are (no suffix), as LLaVA's model_vqa.py asks them; the judge's inputs
  the rows carry (`meta_columns`: column -> meta key) go to the question's meta."""
  out = []
  for i, r in enumerate(export.records):
    qid = str(export.column(r, "question_id", i))
    meta = {key: r[column] for column, key in meta_columns.items() if r.get(column) is not None}
    out.append(Question(qid, export.column(r, "question", i), export.image(i, f"{qid}.jpg"), meta))
  return out


class LlavaBench(Task, JudgedTask):
  """llava-bench-in-the-wild/questions.jsonl, llava-bench-in-the-wild/images/. Prompt: the question as is
  (no suffix), up to 1024 new tokens (LLaVA's model_vqa.py). Judge (llava/eval/eval_gpt_review_bench.py): the
  image's caption (the question's "caption", else context.jsonl's for its image), the question, the reference
  answer (answers_gpt4.jsonl) as Assistant 1 and ours as Assistant 2; the reply's first line holds the two
  scores. Score (summarize_gpt_review.py): our mean score relative to the reference's, x100, overall and per
  category. A reply unread after 3 tries is a failed judgment, left out of the means (LLaVA's script would
  average its [-1, -1] in). lmms-lab/llava-bench-in-the-wild (split train): question_id, question, image, and
  for the judge caption, category, gpt_answer (the reference)."""
  name, folder, label, export = "llava_bench", "llava-bench-in-the-wild", "LLaVA-W", "llava-bench-in-the-wild"
  reference = "LLaVA llava/eval/eval_gpt_review_bench.py + summarize_gpt_review.py (judged with --judge-url)"
  max_new_tokens = 1024

  def read_export(self, folder):
    return _plain_questions(Export(folder, (), ("train",)),
                            {"category": "category", "caption": "caption", "gpt_answer": "reference"})

  def read_llava(self, root):
    return llava_questions(self.path(root, "questions.jsonl"), self.path(root, "images"), None,
                           meta_keys=("category", "caption", "image"))

  def score(self, root, questions, answers):
    return {}

  def headline(self, metrics):
    return metrics.get("relative_score")

  def judge_references(self, root, questions):
    path = self.path(root, "answers_gpt4.jsonl")
    gpt4 = {}  # answers_gpt4.jsonl, read only when a question carries no reference (an export's rows do)
    if any("reference" not in q.meta for q in questions):
      gpt4 = {str(field(row, "question_id", path)): str(field(row, "text", path)) for row in read_jsonl(path)}
    captions = None  # context.jsonl, read only when a question carries no caption
    out = {}
    for q in questions:
      category = q.meta.get("category")
      if category not in prompts.LLAVA_BENCH_CATEGORIES:
        raise LlavaJaxError(f"{self.path(root, 'questions.jsonl')}: question {q.qid}: category {category!r} is not "
                            f"one of {', '.join(prompts.LLAVA_BENCH_CATEGORIES)}")
      reference = q.meta.get("reference", gpt4.get(q.qid))
      if reference is None:
        raise LlavaJaxError(f"{path}: no reference answer for question {q.qid}")
      caption = q.meta.get("caption")
      if caption is None:
        if captions is None:
          context = self.path(root, "context.jsonl")
          captions = {field(row, "image", context): field(row, "caption", context) for row in read_jsonl(context)}
        if q.meta.get("image") not in captions:
          raise LlavaJaxError(f"{self.path(root, 'context.jsonl')}: no caption for image {q.meta.get('image')!r}")
        caption = captions[q.meta["image"]]
      # LLaVA's context.jsonl captions are lists of sentences, joined a line each; a caption string is used as is.
      context_text = "\n".join(caption) if isinstance(caption, list) else str(caption)
      out[q.qid] = {"category": category, "context": context_text, "question": q.text, "reference": str(reference)}
    return out

  def judge_request(self, item, attempt):
    review = prompts.llava_bench_review(item["context"], item["question"], item["reference"], item["answer"])
    return JudgeRequest(({"role": "system", "content": prompts.LLAVA_BENCH_SYSTEM},
                         {"role": "user", "content": review}), temperature=0.2, max_tokens=1024)

  def parse_judgment(self, reply):
    """eval_gpt_review_bench.py's parse_score: the first line, commas as spaces, exactly two numbers (any run of
    spaces one separator: LLaVA's split(" ") would refuse "9, 9")."""
    pair = reply.split("\n")[0].replace(",", " ").split()
    try:
      return [float(pair[0]), float(pair[1])] if len(pair) == 2 else None
    except ValueError:
      return None

  def judge_summary(self, items, scores):
    by_category = {}
    for category in prompts.LLAVA_BENCH_CATEGORIES:
      pairs = [s for qid, s in scores.items() if s is not None and items[qid]["category"] == category]
      if pairs:
        by_category[category] = _relative(pairs)
    pairs = [s for s in scores.values() if s is not None]
    if not pairs:
      return {}
    return {"relative_score": _relative(pairs), "by_category": by_category,
            "reference_mean": statistics.fmean(p[0] for p in pairs),
            "model_mean": statistics.fmean(p[1] for p in pairs)}


def _relative(pairs) -> float | None:
  """Our mean score over the reference's, x100 (summarize_gpt_review.py)."""
  reference = statistics.fmean(p[0] for p in pairs)
  return statistics.fmean(p[1] for p in pairs) / reference * 100 if reference else None


class MmVet(Task, JudgedTask):
  """mm-vet/llava-mm-vet.jsonl, mm-vet/images/. Prompt: the question as is, up to 1024 new tokens. Writes
  TASK/submission.json ({question_id: answer}) as LLaVA's scripts/convert_mmvet_for_eval.py, for MM-Vet's
  GPT-4 grader. Judge (MM-Vet's mm-vet_evaluator.py): the few-shot grading table with the question, the ground
  truth (mm-vet/mm-vet.json) and our answer; the reply's first word is a correctness in [0, 1]; up to 4 retries
  with the "(digit)" suffix at temperatures 0, 0.5, 1, 1.5, then 0.0 and a failed judgment. Score: total and per
  capability (rec, ocr, know, gen, spat, math), the mean correctness x100. lmms-lab/MMVet (split test):
  question_id, question, image, and for the judge answer (the ground truth) and capability."""
  name, folder, label, export = "mm_vet", "mm-vet", "MM-Vet", "MMVet"
  reference = "LLaVA scripts/convert_mmvet_for_eval.py + MM-Vet's mm-vet_evaluator.py (judged with --judge-url)"
  max_new_tokens = 1024
  judge_attempts = 5

  def read_export(self, folder):
    return _plain_questions(Export(folder, (), ("test",)), {"answer": "ground_truth", "capability": "capabilities"})

  def read_llava(self, root):
    return llava_questions(self.path(root, "llava-mm-vet.jsonl"), self.path(root, "images"), None)

  def score(self, root, questions, answers):
    return {}

  def headline(self, metrics):
    return metrics.get("total")

  def write_submission(self, questions, answers, out_dir):
    path = os.path.join(out_dir, "submission.json")
    write_json_atomic({q.qid: answers[q.qid] for q in questions if q.qid in answers}, path)
    return path

  def judge_references(self, root, questions):
    path = self.path(root, "mm-vet.json")
    # mm-vet.json, read only when a question carries no ground truth (an export's rows do)
    truth = read_json(path) if any("ground_truth" not in q.meta for q in questions) else {}
    out = {}
    for q in questions:
      if "ground_truth" in q.meta:
        out[q.qid] = {"question": q.text, "ground_truth": str(q.meta["ground_truth"]),
                      "capabilities": list(q.meta.get("capabilities", ()))}
        continue
      row = truth.get(q.qid)
      if not isinstance(row, dict):
        raise LlavaJaxError(f"{path}: no ground truth for question {q.qid}")
      where = f"{path}: {q.qid}"
      out[q.qid] = {"question": str(field(row, "question", where)), "ground_truth": str(field(row, "answer", where)),
                    "capabilities": list(field(row, "capability", where))}
    return out

  def judge_request(self, item, attempt):
    text = prompts.mm_vet_grading(item["question"], item["ground_truth"], item["answer"], retry=attempt > 0)
    return JudgeRequest(({"role": "user", "content": text},), temperature=0.5 * max(attempt - 1, 0), max_tokens=3)

  def parse_judgment(self, reply):
    try:
      score = float(reply.split(" ")[0].strip())
    except ValueError:
      return None
    return score if 0.0 <= score <= 1.0 else None

  def judge_summary(self, items, scores):
    if not scores:
      return {}
    correct = {qid: 0.0 if s is None else s for qid, s in scores.items()}  # the evaluator's 0.0 after its tries
    by_capability = {}
    for capability in prompts.MM_VET_CAPABILITIES:
      values = [correct[qid] for qid in correct if capability in items[qid]["capabilities"]]
      if values:
        by_capability[capability] = statistics.fmean(values) * 100
    return {"total": statistics.fmean(correct.values()) * 100, "by_capability": by_capability}
