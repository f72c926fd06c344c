"""Short-answer benchmarks: GQA (exact match) and VQAv2, TextVQA, VizWiz (VQA accuracy), as LLaVA-1.5 ran them."""

from __future__ import annotations

import os

from llava_jax.errors import LlavaJaxError
from llava_jax.eval import vqa
from llava_jax.eval.scoring import mean
from llava_jax.eval.tasks.base import (SHORT_ANSWER, Question, Task, export_truth, field, llava_questions,
                                       optional_json, with_suffix)
from llava_jax.eval.tasks.exports import Export
from llava_jax.fileio import write_json_atomic


class Gqa(Task):
  """gqa/llava_gqa_testdev_balanced.jsonl, gqa/data/images/, gqa/data/testdev_balanced_questions.json
  ({question_id: {"answer"}}). Prompt: the question + the short-answer suffix. Scorer: LLaVA's
  scripts/convert_gqa_for_eval.py + GQA's eval.py accuracy (llava_jax.eval.vqa.gqa_correct).
  lmms-lab/GQA: config testdev_balanced_instructions (split testdev: id, imageId, question, answer) and
  config testdev_balanced_images (id, image)."""
  name, folder, label, export = "gqa", "gqa", "GQA", "GQA"
  suffix = SHORT_ANSWER
  reference = "LLaVA scripts/convert_gqa_for_eval.py + GQA eval.py"

  def read_llava(self, root):
    return llava_questions(self.path(root, "llava_gqa_testdev_balanced.jsonl"), self.path(root, "data", "images"),
                           self.suffix)

  def read_export(self, folder):
    export = Export(folder, ("testdev_balanced_instructions",), ("testdev",))
    images = Export(folder, ("testdev_balanced_images",), ("testdev",))
    row_of_image = {str(images.column(r, "id", i)): i for i, r in enumerate(images.records)}
    out = []
    for i, r in enumerate(export.records):
      image_id = str(export.column(r, "imageId", i))
      image = images.image(row_of_image[image_id], f"{image_id}.jpg") if image_id in row_of_image else None
      if image is None:
        raise LlavaJaxError(f"{folder}: no image {image_id!r} in testdev_balanced_images")
      out.append(Question(str(export.column(r, "id", i)), with_suffix(export.column(r, "question", i), self.suffix),
                          image, {"truth": export.column(r, "answer", i)}))
    return out

  def score(self, root, questions, answers):
    path = self.path(root, "data", "testdev_balanced_questions.json")
    truth = export_truth(questions)
    if truth is None:
      files = optional_json(path)
      if files is None:
        return {}
      truth = {qid: field(t, "answer", f"{path}: {qid}") for qid, t in files.items()}
    hits = [vqa.gqa_correct(answers[q.qid], truth[q.qid]) for q in questions if q.qid in answers and q.qid in truth]
    return {"accuracy": mean(hits), "scored": len(hits)} if hits else {}

  def headline(self, metrics):
    return 100 * metrics["accuracy"] if "accuracy" in metrics else None


class VqaAccuracyTask(Task):
  """A benchmark scored with the VQA accuracy against 10 human answers per question."""
  question_file = image_folder = ""
  suffix = SHORT_ANSWER
  splits: tuple[str, ...] = ()  # of the export, in order of preference

  def read_llava(self, root):
    return llava_questions(self.path(root, self.question_file), self.path(root, self.image_folder), self.suffix)

  def read_export(self, folder):
    export = Export(folder, (), self.splits)
    out = []
    for i, r in enumerate(export.records):
      qid = str(export.column(r, "question_id", i))
      answers = r.get("answers")  # absent or null in test splits
      truth = [a["answer"] if isinstance(a, dict) else a for a in answers] if answers else None
      out.append(Question(qid, with_suffix(self.export_text(r), self.suffix), export.image(i, self.image_name(r)),
                          {"truth": truth}))
    return out

  def export_text(self, row) -> str:
    return row["question"]

  def image_name(self, row) -> str:
    return f"{row['question_id']}.jpg"

  def human_answers(self, root, questions) -> dict[str, list[str]] | None:
    """qid -> the human answers, or None where the folder has no annotations."""
    raise NotImplementedError

  def score(self, root, questions, answers):
    truth = export_truth(questions) or self.human_answers(root, questions)
    if truth is None:
      return {}
    scores = [vqa.vqa_accuracy(answers[q.qid], truth[q.qid]) for q in questions if q.qid in answers and q.qid in truth]
    return {"accuracy": mean(scores), "scored": len(scores)} if scores else {}

  def headline(self, metrics):
    return 100 * metrics["accuracy"] if "accuracy" in metrics else None


def _vqa_annotations(path: str) -> dict[str, list[str]] | None:
  """{question_id: answers} of a VQA-format annotation file ({"annotations": [{"question_id", "answers":
  [{"answer"}]}]}), or None when it is absent."""
  data = optional_json(path)
  if data is None:
    return None
  return {str(field(a, "question_id", path)): [x["answer"] for x in field(a, "answers", path)]
          for a in field(data, "annotations", path)}


class TextVqa(VqaAccuracyTask):
  """textvqa/llava_textvqa_val_v051_ocr.jsonl (questions that carry LLaVA-1.5's "Reference OCR token: ..."
  line), textvqa/train_images/, textvqa/TextVQA_0.5.1_val.json ({"data": [{"question_id", "answers"}]}).
  Prompt: the file's text (question, OCR tokens) + the short-answer suffix. Scorer: LLaVA's
  llava/eval/eval_textvqa.py with m4c_evaluator.py's TextVQAAccuracyEvaluator (answers matched by
  question_id, where eval_textvqa.py matches the image and the question's text). lmms-lab/textvqa (split
  validation): question_id, question, answers, ocr_tokens, image_id, image; the OCR line is built from
  ocr_tokens as LLaVA's file has it (lmms-eval's textvqa_val with ocr: true)."""
  name, folder, label, export = "textvqa", "textvqa", "TextVQA", "textvqa"
  reference = "LLaVA llava/eval/eval_textvqa.py + llava/eval/m4c_evaluator.py"
  question_file, image_folder = "llava_textvqa_val_v051_ocr.jsonl", "train_images"
  splits = ("validation",)

  def export_text(self, row):
    tokens = row.get("ocr_tokens") or []
    return f"{row['question']}\nReference OCR token: {', '.join(tokens)}" if tokens else row["question"]

  def image_name(self, row):
    return f"{row.get('image_id') or row['question_id']}.jpg"

  def human_answers(self, root, questions):
    path = self.path(root, "TextVQA_0.5.1_val.json")
    data = optional_json(path)
    if data is None:
      return None
    return {str(field(d, "question_id", path)): field(d, "answers", path) for d in field(data, "data", path)}


class VqaV2(VqaAccuracyTask):
  """vqav2/llava_vqav2_mscoco_test-dev2015.jsonl, vqav2/test2015/; scored locally when
  vqav2/v2_mscoco_val2014_annotations.json (VQA format) holds the questions' annotations (the test-dev
  answers are on the EvalAI server). Prompt: the question + the short-answer suffix. Writes
  TASK/submission.json as LLaVA's scripts/convert_vqav2_for_submission.py ([{"question_id", "answer"}],
  answers EvalAI-normalized). Scorer: the VQA accuracy (llava_jax.eval.vqa). lmms-lab/VQAv2 (split testdev,
  else test or validation: question_id, question, answers [{"answer"}] where annotated, image_id, image)."""
  name, folder, label, export = "vqav2", "vqav2", "VQAv2", "VQAv2"
  reference = "LLaVA scripts/convert_vqav2_for_submission.py; VQA accuracy as m4c_evaluator.py"
  question_file, image_folder = "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015"
  splits = ("testdev", "test", "validation")

  def image_name(self, row):
    return f"COCO_{row.get('image_id', row['question_id'])}.jpg"

  def human_answers(self, root, questions):
    return _vqa_annotations(self.path(root, "v2_mscoco_val2014_annotations.json"))

  def write_submission(self, questions, answers, out_dir):
    rows = [{"question_id": int(q.qid) if q.qid.isdigit() else q.qid, "answer": vqa.normalize(answers.get(q.qid, ""))}
            for q in questions]
    path = os.path.join(out_dir, "submission.json")
    write_json_atomic(rows, path)
    return path


class VizWiz(VqaAccuracyTask):
  """vizwiz/llava_test.jsonl, vizwiz/test/; scored locally when vizwiz/val.json (VizWiz format: [{"image",
  "answers": [{"answer"}]}]) annotates the questions' images. Prompt: the question + "When the provided
  information is insufficient, respond with 'Unanswerable'." + the short-answer suffix (LLaVA-1.5's).
  Writes TASK/submission.json as LLaVA's scripts/convert_vizwiz_for_submission.py ([{"image", "answer"}]).
  Scorer: the VQA accuracy (llava_jax.eval.vqa). lmms-lab/VizWiz-VQA (split test, else val): question_id
  (the image's name less .jpg), question, answers, image."""
  name, folder, label, export = "vizwiz", "vizwiz", "VizWiz", "VizWiz-VQA"
  reference = "LLaVA scripts/convert_vizwiz_for_submission.py; VQA accuracy as m4c_evaluator.py"
  question_file, image_folder = "llava_test.jsonl", "test"
  splits = ("test", "val")
  suffix = f"When the provided information is insufficient, respond with 'Unanswerable'.\n{SHORT_ANSWER}"

  def human_answers(self, root, questions):
    path = self.path(root, "val.json")
    data = optional_json(path, list)
    if data is None:
      return None
    by_image = {field(d, "image", path): [a["answer"] for a in field(d, "answers", path)] for d in data}
    return {q.qid: by_image[os.path.basename(q.image)] for q in questions if os.path.basename(q.image) in by_image}

  def write_submission(self, questions, answers, out_dir):
    rows = [{"image": os.path.basename(q.image_file()), "answer": vqa.normalize(answers.get(q.qid, ""))}
            for q in questions]
    path = os.path.join(out_dir, "submission.json")
    write_json_atomic(rows, path)
    return path
