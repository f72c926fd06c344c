"""Multiple-choice benchmarks: ScienceQA-IMG, MMBench (circular) and SEED-Bench (images), as LLaVA-1.5 ran them.

Every prompt ends with LLaVA-1.5's "Answer with the option's letter from the given choices directly.";
replies are read by llava_jax.eval.choice.option_letter.
"""

from __future__ import annotations

import base64
import csv
import os
import sys

from llava_jax.errors import LlavaJaxError
from llava_jax.eval import choice
from llava_jax.eval.tasks.base import (MULTIPLE_CHOICE, Question, Task, export_truth, field, llava_questions,
                                       optional_json, with_suffix)
from llava_jax.eval.tasks.exports import Export
from llava_jax.fileio import atomic_file, read_json


def _records(questions, answers, truth) -> list[dict]:
  """Scorer records of the answered questions that `truth(question)` -> (letter, number of options) knows."""
  out = []
  for q in questions:
    known = truth(q) if q.qid in answers else None
    if known:
      scorer_meta = {k: v for k, v in q.meta.items() if k != "truth"}
      out.append({"prediction": answers[q.qid], "answer": known[0], "num_options": known[1], **scorer_meta})
  return out


def _percent(metrics: dict, key: str = "accuracy") -> float | None:
  return 100 * metrics[key] if key in metrics else None


class ScienceQaImg(Task):
  """scienceqa/llava_test_CQM-A.json ([{"id", "image", "conversations": [{"value": "Context: ...\\nQuestion:
  ...\\nOptions: (A) ..."}]}]; only the questions with an image), scienceqa/images/test/,
  scienceqa/problems.json ({id: {"choices", "answer": index}}). Prompt: the first human turn without its
  <image> tag + the multiple-choice suffix (LLaVA's model_vqa_science.py --single-pred-prompt). Scorer:
  LLaVA's llava/eval/eval_science_qa.py (IMG accuracy). lmms-lab/ScienceQA, config ScienceQA-IMG (split test:
  image, question, choices, answer: index, hint; no id: questions are numbered by row), asked as LLaVA's
  scripts/convert_sqa_to_llava.py wrote them ("Context: HINT or N/A\nQuestion: ...\nOptions: (A) ... (B) ...")."""
  name, folder, label, export = "scienceqa_img", "scienceqa", "SQA-IMG", "ScienceQA"
  suffix = MULTIPLE_CHOICE
  reference = "LLaVA llava/eval/eval_science_qa.py"

  def read_export(self, folder):
    export = Export(folder, ("ScienceQA-IMG",), ("test",))
    out = []
    for i, r in enumerate(export.records):
      image = export.image(i, f"{i}/image.png")
      if image is None:  # the text-only questions are not part of the IMG subset
        continue
      choices = export.column(r, "choices", i)
      options = " ".join(f"({choice.LETTERS[k]}) {c}" for k, c in enumerate(choices))
      text = f"Context: {(r.get('hint') or '').strip() or 'N/A'}\nQuestion: {export.column(r, 'question', i)}\n" \
             f"Options: {options}"
      truth = (choice.LETTERS[export.column(r, "answer", i)], len(choices))
      out.append(Question(str(i), with_suffix(text, self.suffix), image, {"truth": truth}))
    return out

  def read_llava(self, root):
    path = self.path(root, "llava_test_CQM-A.json")
    out = []
    for n, row in enumerate(read_json(path, list)):
      if not isinstance(row, dict):
        raise LlavaJaxError(f"{path}: item {n} is not a JSON object")
      if not row.get("image"):
        continue
      turns = field(row, "conversations", f"{path}: item {n}")
      text = str(field(turns[0], "value", f"{path}: item {n}")).replace("<image>", "").strip()
      out.append(Question(str(field(row, "id", f"{path}: item {n}")), with_suffix(text, self.suffix),
                          self.path(root, "images", "test", row["image"])))
    return out

  def score(self, root, questions, answers):
    in_rows = export_truth(questions)
    problems = None if in_rows else optional_json(self.path(root, "problems.json"))
    if not (in_rows or problems):
      return {}

    def truth(q):
      if in_rows:
        return in_rows.get(q.qid)
      p = problems.get(q.qid)
      return (choice.LETTERS[p["answer"]], len(p["choices"])) if p else None
    records = _records(questions, answers, truth)
    return {**choice.accuracy(records), "scored": len(records)} if records else {}

  def headline(self, metrics):
    return _percent(metrics)


class MmBench(Task):
  """mmbench/mmbench_dev_20230712.tsv (MMBench's TSV: index, question, hint, A-D, answer, category, image in
  base64). Every question is asked once per rotation of its options (LLaVA's model_vqa_mmbench.py
  --all-rounds). Prompt: the hint, the question, "A. option" lines, the multiple-choice suffix. Scorer:
  MMBench's circular evaluation (right only if every rotation is; llava_jax.eval.choice), per category
  too; `single_round` is the accuracy of the unrotated questions alone. lmms-lab/MMBench, config en (split dev):
  the TSV's columns, the image as an image column."""
  name, folder, label, export = "mmbench", "mmbench", "MMB", "MMBench"
  suffix = MULTIPLE_CHOICE
  reference = "LLaVA llava/eval/model_vqa_mmbench.py --all-rounds; MMBench CircularEval"
  tsv = "mmbench_dev_20230712.tsv"
  # LLaVA's scripts/convert_mmbench_for_submission.py: the TSV's columns less hint, category, source, image,
  # comment and l2-category, with the prediction after the options.
  SUBMISSION_COLUMNS = ("index", "question", "A", "B", "C", "D", "answer", "split")

  def read_export(self, folder):
    export = Export(folder, ("en",), ("dev",))
    return self._questions(export.records, lambda n: f"{folder}: row {n}",
                           lambda n, row: export.image(n, f"{row.get('index', n)}.jpg") or b"")

  def read_llava(self, root):
    path = self.path(root, self.tsv)
    csv.field_size_limit(sys.maxsize)  # the images are base64 fields of megabytes
    try:
      with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError:
      raise LlavaJaxError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
      raise LlavaJaxError(f"{path}: cannot read ({e})") from None
    where_of = lambda n: f"{path}:{n + 2}"  # the header is line 1
    return self._questions(rows, where_of, lambda n, row: _base64_image(field(row, "image", where_of(n))))

  def _questions(self, rows, where_of, image_of) -> list[Question]:
    """Every rotation of every row's question; where_of(n) names row n in errors, image_of(n, row) is its image."""
    out = []
    for n, row in enumerate(rows):
      where = where_of(n)
      options = []
      for letter in "ABCD":  # up to the first empty option, as LLaVA's get_options
        if not (row.get(letter) or "").strip() or row[letter].strip().lower() == "nan":
          break
        options.append(row[letter].strip())
      answer = (row.get("answer") or "").strip()
      if answer and answer not in choice.LETTERS[:len(options)]:
        raise LlavaJaxError(f"{where}: answer {answer!r} is not one of the {len(options)} options")
      image = image_of(n, row)
      hint = (row.get("hint") or "").strip()
      stem = str(field(row, "question", where)).strip()
      stem = f"{hint}\n{stem}" if hint and hint.lower() != "nan" else stem
      index = str(field(row, "index", where))
      for r, (shown, right) in enumerate(choice.rotations(options, answer or "A")):
        text = stem + "".join(f"\n{choice.LETTERS[i]}. {o}" for i, o in enumerate(shown))
        meta = {"index": index, "round": r, "category": row.get("category", ""), "num_options": len(options)}
        if r == 0:  # the submission file repeats the question's columns
          meta["columns"] = {k: "" if v is None else str(v) for k, v in row.items() if k in self.SUBMISSION_COLUMNS}
        out.append(Question(f"{index}/{r}", with_suffix(text, self.suffix), image,
                            {**meta, "answer": right} if answer else meta))
    return out

  def score(self, root, questions, answers):
    records = _records(questions, answers, lambda q: (q.meta["answer"], q.meta["num_options"]) if "answer" in q.meta
                       else None)
    if not records:
      return {}
    unrotated = [r for r in records if r["round"] == 0]
    return {**choice.circular_accuracy(records, "category"), "single_round": choice.accuracy(unrotated)["accuracy"],
            "scored": len({r["index"] for r in records})}

  def headline(self, metrics):
    return _percent(metrics)

  def write_submission(self, questions, answers, out_dir):
    """OUT/mmbench/submission.xlsx for MMBench's server: per question its columns and the reply to the unrotated
    options (convert_mmbench_for_submission.py's layout)."""
    import openpyxl
    unrotated = [q for q in questions if q.meta["round"] == 0]
    header = [c for c in self.SUBMISSION_COLUMNS if any(c in q.meta["columns"] for q in unrotated)]
    header.insert(header.index("D") + 1 if "D" in header else len(header), "prediction")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(header)
    for q in unrotated:
      cells = dict(q.meta["columns"], prediction=answers.get(q.qid, ""))
      sheet.append([cells.get(c, "") for c in header])
    path = os.path.join(out_dir, "submission.xlsx")
    with atomic_file(path) as tmp:
      book.save(tmp)
    return path


def _base64_image(text: str) -> bytes:
  """An image of MMBench's TSV; b"" (a counted skip when asked) where it is not base64."""
  try:
    return base64.b64decode(text, validate=True)
  except ValueError:
    return b""


class SeedImage(Task):
  """seed_bench/llava-seed-bench.jsonl ({"question_id", "image", "text": question and "A. ..." option lines,
  "category"}; the image questions only: those not under SEED-Bench-video-image/), images under seed_bench/,
  seed_bench/SEED-Bench.json ({"questions": [{"question_id", "answer": letter}]}). Prompt: the file's text +
  the multiple-choice suffix. Scorer: LLaVA's scripts/convert_seed_for_submission.py accuracy (replies read
  by option_letter rather than compared verbatim), per category too. lmms-lab/SEED-Bench (split test:
  question_id, question, choice_a..choice_d, answer, data_type, question_type_id, image: a list of frames)."""
  name, folder, label, export = "seed_image", "seed_bench", "SEED-I", "SEED-Bench"
  suffix = MULTIPLE_CHOICE
  reference = "LLaVA scripts/convert_seed_for_submission.py"
  # SEED-Bench.json's "question_type": the names LLaVA's question file gives as category.
  CATEGORIES = ("Scene Understanding", "Instance Identity", "Instance Attributes", "Instance Location",
                "Instances Counting", "Spatial Relation", "Instance Interaction", "Visual Reasoning",
                "Text Understanding", "Action Recognition", "Action Prediction", "Procedure Understanding")

  def read_export(self, folder):
    export = Export(folder, (), ("test",))
    out = []
    for i, r in enumerate(export.records):
      if r.get("data_type", "image") != "image":
        continue
      qid = str(export.column(r, "question_id", i))
      text = export.column(r, "question", i) + "".join(
          f"\n{letter}. {export.column(r, f'choice_{letter.lower()}', i)}" for letter in "ABCD")
      type_id = int(export.column(r, "question_type_id", i))
      out.append(Question(qid, with_suffix(text, self.suffix), export.image(i, f"{qid}.png"),
                          {"category": self.CATEGORIES[type_id - 1], "truth": export.column(r, "answer", i)}))
    return out

  def read_llava(self, root):
    questions = llava_questions(self.path(root, "llava-seed-bench.jsonl"), self.path(root), self.suffix,
                                ("category",))
    return [q for q in questions if "SEED-Bench-video-image" not in (q.image or "")]

  def score(self, root, questions, answers):
    path = self.path(root, "SEED-Bench.json")
    truth = export_truth(questions)
    if truth is None:
      data = optional_json(path)
      if data is None:
        return {}
      truth = {str(field(q, "question_id", path)): field(q, "answer", path) for q in field(data, "questions", path)}
    records = _records(questions, answers, lambda q: (truth[q.qid], 4) if q.qid in truth else None)
    return {**choice.accuracy(records, "category"), "scored": len(records)} if records else {}

  def headline(self, metrics):
    return _percent(metrics)
