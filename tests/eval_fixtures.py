"""A tiny copy of LLaVA's playground/data/eval layout for every task, and a scripted model's replies to it.

`REPLIES` maps a question's first line to the reply; expected scores in the tests are computed by hand
from them. MMBench replies are computed from the rotated options (`mmbench_reply`). `ScriptedSession` stands in
for the model and gives these replies.
"""

import base64
import io
import json
import types

import numpy as np
import pytest
from PIL import Image


def png(seed=0) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (28, 28, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _write(path, content):
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content)


def _jsonl(rows):
  return "".join(json.dumps(r) + "\n" for r in rows)


REPLIES = {
    # pope: random (labels yes, no), adversarial (labels no, yes)
    "Is there a dog in the image?": "Yes", "Is there a cat in the image?": "Yes, there is.",
    "Is there a car in the image?": "No, there is not.", "Is there a bus in the image?": "no",
    # mme: existence (truths yes, no), code_reasoning (truths yes, no)
    "Is there a tree in this image?": "Yes", "Is there a boat in this image?": "No",
    "Does this code print 3?": "The answer is yes", "Does this code print 4?": "no",
    # gqa: truths yes, right, table
    "Is it sunny?": "Yes.", "Which side is the cup on?": "left", "What is under the cup?": "The table",
    "What color is it?": "red",  # its image is corrupt: a counted skip
    # textvqa: 2 of 10 humans said "stop"; all 10 said "coca cola"
    "what does the sign say?": "Stop.", "what brand is it?": "coca cola",
    "How many cats?": "Two.",  # vqav2
    "What is this?": "Unanswerable.",  # vizwiz: all 10 humans said unanswerable
    # scienceqa: answers B (index 1), A (index 0)
    "Context: none\nQuestion: Which is a mammal?": "The answer is (B).", "Context: none\nQuestion: Which is hot?": "B.",
    # seed: answers A, C
    "Which object is round?": "A", "What is the weather?": "B",
    # llava_bench, mm_vet
    "Describe the image.": "A picture.", "What is the man doing?": "He is ironing.", "Why is it funny?": "It is odd.",
    "What is written here?": "Hello.", "What is x in the equation?": "x = -1",
}


def mmbench_reply(prompt: str) -> str:
  """Question 1 (right option "dog"): the letter "dog" is shown under; question 2: always "A"."""
  if prompt.startswith("Which animal barks?"):
    return next(line[0] for line in prompt.splitlines() if line.endswith(". dog"))
  return "A"


def reply(prompt: str) -> str:
  if prompt.startswith(("Which animal barks?", "Pick the first.")):
    return mmbench_reply(prompt)
  return next(r for q, r in REPLIES.items() if prompt.startswith(q))


def build(root):
  """Writes the layout under root (LLaVA's playground/data/eval); returns root."""
  image = png()
  pope = [{"question_id": i, "image": "p.png", "text": f"{q}\nAnswer the question using a single word or phrase.",
           "category": c} for i, (q, c) in enumerate([
               ("Is there a dog in the image?", "random"), ("Is there a cat in the image?", "random"),
               ("Is there a car in the image?", "adversarial"), ("Is there a bus in the image?", "adversarial")])]
  _write(root / "pope" / "llava_pope_test.jsonl", _jsonl(pope))
  _write(root / "pope" / "val2014" / "p.png", image)
  _write(root / "pope" / "coco" / "coco_pope_random.json", _jsonl([{"label": "yes"}, {"label": "no"}]))
  _write(root / "pope" / "coco" / "coco_pope_adversarial.json", _jsonl([{"label": "no"}, {"label": "yes"}]))

  release = root / "MME" / "MME_Benchmark_release_version"
  _write(root / "MME" / "llava_mme.jsonl", _jsonl([
      {"question_id": "existence/a.png", "image": "existence/a.png", "category": "existence",
       "text": "Is there a tree in this image? Please answer yes or no.\n"
               "Answer the question using a single word or phrase."},
      {"question_id": "existence/a.png", "image": "existence/a.png", "category": "existence",
       "text": "Is there a boat in this image? Please answer yes or no."},
      {"question_id": "code_reasoning/b.png", "image": "code_reasoning/b.png", "category": "code_reasoning",
       "text": "Does this code print 3? Please answer yes or no."},
      {"question_id": "code_reasoning/b.png", "image": "code_reasoning/b.png", "category": "code_reasoning",
       "text": "Does this code print 4? Please answer yes or no."}]))
  _write(release / "existence" / "a.png", image)
  _write(release / "existence" / "a.txt",
         "Is there a tree in this image? Please answer yes or no.\tYes\n"
         "Is there a boat in this image? Please answer yes or no.\tNo\n")
  _write(release / "code_reasoning" / "images" / "b.png", image)  # the images/ + questions_answers_YN/ layout
  _write(release / "code_reasoning" / "questions_answers_YN" / "b.txt",
         "Does this code print 3? Please answer yes or no.\tYes\n"
         "Does this code print 4?  Please answer yes or no.\tNo\n")  # two spaces, as some of MME's files

  gqa = [("g1", "Is it sunny?", "yes"), ("g2", "Which side is the cup on?", "right"),
         ("g3", "What is under the cup?", "table"), ("g4", "What color is it?", "red")]
  _write(root / "gqa" / "llava_gqa_testdev_balanced.jsonl",
         _jsonl([{"question_id": q, "image": "bad.png" if q == "g4" else "g.png", "text": t} for q, t, _ in gqa]))
  _write(root / "gqa" / "data" / "images" / "g.png", image)
  _write(root / "gqa" / "data" / "images" / "bad.png", b"not a png")
  _write(root / "gqa" / "data" / "testdev_balanced_questions.json", json.dumps({q: {"answer": a} for q, _, a in gqa}))

  _write(root / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl", _jsonl([
      {"question_id": 11, "image": "t.png", "text": "what does the sign say?\nReference OCR token: STOP"},
      {"question_id": 12, "image": "t.png", "text": "what brand is it?\nReference OCR token: Coca, Cola"}]))
  _write(root / "textvqa" / "train_images" / "t.png", image)
  _write(root / "textvqa" / "TextVQA_0.5.1_val.json", json.dumps({"data": [
      {"question_id": 11, "answers": ["stop", "STOP"] + ["go"] * 8},
      {"question_id": 12, "answers": ["coca cola"] * 10}]}))

  _write(root / "vqav2" / "llava_vqav2_mscoco_test-dev2015.jsonl",
         _jsonl([{"question_id": 7, "image": "v.png", "text": "How many cats?"}]))
  _write(root / "vqav2" / "test2015" / "v.png", image)

  _write(root / "vizwiz" / "llava_test.jsonl", _jsonl([{"question_id": 0, "image": "VizWiz_val_1.png",
                                                        "text": "What is this?"}]))
  _write(root / "vizwiz" / "test" / "VizWiz_val_1.png", image)
  _write(root / "vizwiz" / "val.json", json.dumps([{"image": "VizWiz_val_1.png",
                                                    "answers": [{"answer": "unanswerable"}] * 10}]))

  _write(root / "scienceqa" / "llava_test_CQM-A.json", json.dumps([
      {"id": "s1", "image": "s1/image.png", "conversations": [
          {"from": "human",
           "value": "Context: none\nQuestion: Which is a mammal?\nOptions: (A) frog (B) cow\n<image>"}]},
      {"id": "s2", "conversations": [  # no image: not part of scienceqa_img
          {"from": "human", "value": "Question: Which is text only?\nOptions: (A) a (B) b"}]},
      {"id": "s3", "image": "s3/image.png", "conversations": [
          {"from": "human", "value": "<image>\nContext: none\nQuestion: Which is hot?\nOptions: (A) fire (B) ice"}]}]))
  for sid in ("s1", "s3"):
    _write(root / "scienceqa" / "images" / "test" / sid / "image.png", image)
  _write(root / "scienceqa" / "problems.json", json.dumps({
      "s1": {"choices": ["frog", "cow"], "answer": 1}, "s2": {"choices": ["a", "b"], "answer": 0},
      "s3": {"choices": ["fire", "ice"], "answer": 0}}))

  b64 = base64.b64encode(image).decode()
  _write(root / "mmbench" / "mmbench_dev_20230712.tsv",
         "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
         f"1\tWhich animal barks?\tnan\tcat\tdog\tcow\t\tB\tanimals\t{b64}\n"
         f"2\tPick the first.\t\tone\ttwo\t\t\tA\tcounting\t{b64}\n")

  _write(root / "seed_bench" / "llava-seed-bench.jsonl", _jsonl([
      {"question_id": "101", "image": "SEED-Bench-image/a.png", "category": "Instance Attributes",
       "text": "Which object is round?\nA. ball\nB. box\nC. book\nD. pen"},
      {"question_id": "102", "image": "SEED-Bench-image/a.png", "category": "Scene Understanding",
       "text": "What is the weather?\nA. rain\nB. snow\nC. sun\nD. fog"},
      {"question_id": "103", "image": "SEED-Bench-video-image/v/1.png", "category": "Action Recognition",
       "text": "What happens?\nA. a\nB. b\nC. c\nD. d"}]))
  _write(root / "seed_bench" / "SEED-Bench-image" / "a.png", image)
  _write(root / "seed_bench" / "SEED-Bench.json", json.dumps({"questions": [
      {"question_id": "101", "answer": "A", "data_type": "image"},
      {"question_id": "102", "answer": "C", "data_type": "image"},
      {"question_id": "103", "answer": "B", "data_type": "video"}]}))

  bench = root / "llava-bench-in-the-wild"
  _write(bench / "questions.jsonl", _jsonl([
      {"question_id": 0, "image": "w.png", "text": "Describe the image.", "category": "detail"},
      {"question_id": 1, "image": "w.png", "text": "What is the man doing?", "category": "conv"},
      {"question_id": 2, "image": "x.png", "text": "Why is it funny?", "category": "complex",
       "caption": "A cat wears a hat."}]))  # its caption in the question file; the others' in context.jsonl
  _write(bench / "images" / "w.png", image)
  _write(bench / "images" / "x.png", image)
  _write(bench / "context.jsonl", _jsonl([{"id": "w", "image": "w.png",
                                           "caption": ["A man irons on a taxi.", "The street is busy."]}]))
  _write(bench / "answers_gpt4.jsonl", _jsonl([
      {"question_id": 0, "text": "A man irons clothes on the back of a taxi."},
      {"question_id": 1, "text": "He is ironing a shirt."}, {"question_id": 2, "text": "Cats do not wear hats."}]))
  _write(root / "mm-vet" / "llava-mm-vet.jsonl", _jsonl([
      {"question_id": "v1_0", "image": "v1_0.png", "text": "What is written here?"},
      {"question_id": "v1_1", "image": "v1_0.png", "text": "What is x in the equation?"}]))
  _write(root / "mm-vet" / "images" / "v1_0.png", image)
  _write(root / "mm-vet" / "mm-vet.json", json.dumps({  # MM-Vet's ground truth and capabilities
      "v1_0": {"imagename": "v1_0.png", "capability": ["ocr", "rec"], "question": "What is written here?",
               "answer": "Hello"},
      "v1_1": {"imagename": "v1_0.png", "capability": ["ocr", "math"], "question": "What is x in the equation?",
               "answer": "-1<AND>-5"}}))
  return root


def eval_cli_error(capsys, *args) -> str:
  """The one line `llava-jax eval ARGS` writes on stderr as it exits 2."""
  from llava_jax import cli
  with pytest.raises(SystemExit) as e:
    cli.main(["eval", *args])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  return err


def use_scripted_session(monkeypatch) -> "ScriptedSession":
  """A ScriptedSession in place of the model that infer.run.load_session would load (whatever its options)."""
  session = ScriptedSession()
  monkeypatch.setattr("llava_jax.infer.run.load_session", lambda path, mesh=None, **options: session)
  return session


class ScriptedSession:
  """Stands in for infer.run.Session: the reply to a prompt is reply(its text)."""

  def __init__(self):
    self.texts, self.batches = [], []
    decode = lambda tokens: reply(self.texts[tokens[0]])
    self.processor = types.SimpleNamespace(prepare=self._prepare, decode=decode)
    self.engine = types.SimpleNamespace(generate=self._generate)

  def _prepare(self, text, images, names=None):
    assert len(images) == 1 and images[0].size == (28, 28)
    self.texts.append(text)
    return types.SimpleNamespace(input_ids=np.array([len(self.texts) - 1]), pixel_values=[], image_feature_index=None)

  def _generate(self, prompts, max_new_tokens, params):
    assert params.temperature == 0  # greedy
    self.batches.append(len(prompts))
    return [types.SimpleNamespace(tokens=p.input_ids) for p in prompts]


def write_export(folder, split, rows, image_column="image", saved=False):
  """One split of an lmms-lab export: rows with their images embedded ({"bytes"} cells of an Image column, or a
  list of them), written as the hub's parquet shard (or with save_to_disk)."""
  import datasets
  datasets.disable_progress_bars()  # its bars on stderr would mix with the CLI's one-line errors under test
  features = datasets.Dataset.from_list([{k: v for k, v in rows[0].items() if k != image_column}]).features
  if image_column in rows[0]:
    many = isinstance(rows[0][image_column], list)
    features[image_column] = datasets.List(datasets.Image()) if many else datasets.Image()
    cell = lambda b: None if b is None else {"bytes": b, "path": None}
    rows = [dict(r, **{image_column: [cell(b) for b in r[image_column]] if many else cell(r[image_column])})
            for r in rows]
  dataset = datasets.Dataset.from_list(rows, features=features)
  if saved:
    datasets.DatasetDict({split: dataset}).save_to_disk(str(folder))
  else:
    folder.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))


def build_exports(root):
  """The questions of `build` as lmms-lab's exports (their folder names, configs, splits and columns)."""
  image = png()
  write_export(root / "POPE" / "data", "test", [
      {"question_id": str(i), "question": q, "answer": a, "image_source": f"COCO_{i}", "image": image, "category": c}
      for i, (q, a, c) in enumerate([
          ("Is there a dog in the image?", "yes", "random"), ("Is there a cat in the image?", "no", "random"),
          ("Is there a car in the image?", "no", "adversarial"),
          ("Is there a bus in the image?", "yes", "adversarial")])])
  write_export(root / "MME", "test", [
      {"question_id": qid, "question": f"{q} Please answer yes or no.", "answer": a, "category": qid.split("/")[0],
       "image": image} for qid, q, a in [
          ("existence/a.png", "Is there a tree in this image?", "Yes"),
          ("existence/a.png", "Is there a boat in this image?", "No"),
          ("code_reasoning/b.png", "Does this code print 3?", "Yes"),
          ("code_reasoning/b.png", "Does this code print 4?", "No")]], saved=True)
  write_export(root / "GQA" / "testdev_balanced_instructions", "testdev", [
      {"id": q, "imageId": "bad" if q == "g4" else "g", "question": t, "answer": a, "fullAnswer": a} for q, t, a in [
          ("g1", "Is it sunny?", "yes"), ("g2", "Which side is the cup on?", "right"),
          ("g3", "What is under the cup?", "table"), ("g4", "What color is it?", "red")]])
  write_export(root / "GQA" / "testdev_balanced_images", "testdev", [{"id": "g", "image": image},
                                                               {"id": "bad", "image": b"not a png"}])
  write_export(root / "textvqa" / "data", "validation", [
      {"question_id": 11, "question": "what does the sign say?", "ocr_tokens": ["STOP"], "image_id": "t",
       "answers": ["stop", "STOP"] + ["go"] * 8, "image": image},
      {"question_id": 12, "question": "what brand is it?", "ocr_tokens": ["Coca", "Cola"], "image_id": "t",
       "answers": ["coca cola"] * 10, "image": image}])
  write_export(root / "VQAv2" / "data", "testdev", [{"question_id": 7, "question": "How many cats?", "answers": None,
                                                "image_id": 1, "image": image}])
  write_export(root / "VizWiz-VQA" / "data", "val", [{"question_id": "VizWiz_val_1", "question": "What is this?",
                                                  "answers": ["unanswerable"] * 10, "category": "other",
                                                  "image": image}])
  write_export(root / "ScienceQA" / "ScienceQA-IMG", "test", [
      {"question": "Which is a mammal?", "choices": ["frog", "cow"], "answer": 1, "hint": "none", "image": image},
      {"question": "Which is hot?", "choices": ["fire", "ice"], "answer": 0, "hint": "none", "image": image}])
  write_export(root / "MMBench" / "en", "dev", [
      {"index": 1, "question": "Which animal barks?", "hint": None, "A": "cat", "B": "dog", "C": "cow", "D": None,
       "answer": "B", "category": "animals", "image": image},
      {"index": 2, "question": "Pick the first.", "hint": None, "A": "one", "B": "two", "C": None, "D": None,
       "answer": "A", "category": "counting", "image": image}])
  write_export(root / "SEED-Bench" / "data", "test", [
      {"question_id": qid, "question": q, "choice_a": a, "choice_b": b, "choice_c": c, "choice_d": d, "answer": ans,
       "data_type": kind, "question_type_id": t, "image": [image]} for qid, q, (a, b, c, d), ans, kind, t in [
          ("101", "Which object is round?", ("ball", "box", "book", "pen"), "A", "image", 3),
          ("102", "What is the weather?", ("rain", "snow", "sun", "fog"), "C", "image", 1),
          ("103", "What happens?", ("a", "b", "c", "d"), "B", "video", 10)]])
  taxi = "A man irons on a taxi.\nThe street is busy."  # context.jsonl's sentences, a line each
  write_export(root / "llava-bench-in-the-wild" / "data", "train", [
      {"question_id": qid, "question": q, "category": c, "caption": caption, "gpt_answer": ref, "image": image}
      for qid, q, c, caption, ref in [
          (0, "Describe the image.", "detail", taxi, "A man irons clothes on the back of a taxi."),
          (1, "What is the man doing?", "conv", taxi, "He is ironing a shirt."),
          (2, "Why is it funny?", "complex", "A cat wears a hat.", "Cats do not wear hats.")]])
  write_export(root / "MMVet" / "data", "test", [
      {"question_id": "v1_0", "question": "What is written here?", "answer": "Hello", "capability": ["ocr", "rec"],
       "image": image},
      {"question_id": "v1_1", "question": "What is x in the equation?", "answer": "-1<AND>-5",
       "capability": ["ocr", "math"], "image": image}])
  return root
