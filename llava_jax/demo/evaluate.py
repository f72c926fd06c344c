"""Evaluation of the demo model on held-out ShapesWorld images, through the generation engine.

Every question is asked the way `llava-jax generate` asks it (the model folder's processor and
chat template, greedy decoding), once with its image and once with the image replaced by a
blank one (the blind ablation: what the language model answers from priors alone).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from llava_jax.data import instruct_engine
from llava_jax.eval import pope, scoring
from llava_jax.infer.generate import Prompt
from llava_jax.infer.sampling import SamplingParams

QA_TYPES = instruct_engine.QA_TYPES
HEADLINE_TYPES = ("color", "shape", "existence")  # the "averaged over" set
REFERENCE_TYPES = ("color", "shape")  # questions that name their object by an attribute (args["ref"])
BATCH = 64  # one compiled batch shape for every question


def blank_image(size: int) -> Image.Image:
  return Image.new("RGB", (size, size), (255, 255, 255))


class Asker:
  """Batched greedy answers to (question, image path) pairs; images preprocessed once."""

  MAX_NEW_TOKENS = 20  # "A red star? The stars are blue and red. No."

  def __init__(self, session, image_folder: str, max_new_tokens: int = MAX_NEW_TOKENS):
    self.session, self.folder, self.max_new_tokens = session, image_folder, max_new_tokens
    self._pixels: dict[str | None, np.ndarray] = {}

  def pixels(self, path: str | None) -> np.ndarray:
    if path not in self._pixels:
      size = self.session.engine.config.vision.image_size
      image = blank_image(size) if path is None else Image.open(os.path.join(self.folder, path)).convert("RGB")
      self._pixels[path] = self.session.processor.image_processor([image])
    return self._pixels[path]

  def prompt(self, question: str, path: str | None) -> Prompt:
    processor = self.session.processor
    text = processor.format_prompt(question, 1)
    ids = processor.tokenizer(text, add_special_tokens=processor.adds_special_tokens(text))["input_ids"]
    # Expanding the one image token after tokenizing equals tokenizing the expanded text (it is a
    # special token), and lets each image be preprocessed once for all its questions.
    tag = processor.image_token_id
    size = self.session.engine.config.vision.image_size
    tokens = processor.layout.num_image_tokens((size, size))  # demo models: the fixed layout, one tower input
    ids = np.concatenate([np.full(tokens, tag) if t == tag else [t] for t in ids])
    return Prompt(ids.astype(np.int32), self.pixels(path))

  def ask(self, items: Sequence[tuple[str, str | None]], progress: Callable[[int], None] | None = None,
          max_new_tokens: int | None = None) -> list[str]:
    engine, processor = self.session.engine, self.session.processor
    prompts = [self.prompt(q, p) for q, p in items]
    answers: list[str] = []
    for start in range(0, len(prompts), BATCH):
      chunk = prompts[start:start + BATCH]
      padded = chunk + [chunk[-1]] * (BATCH - len(chunk)) if len(prompts) > BATCH else chunk
      out = engine.generate(padded, max_new_tokens or self.max_new_tokens, SamplingParams())
      answers += [processor.decode(c.tokens).strip() for c in out[:len(chunk)]]
      if progress:
        progress(len(chunk))
    return answers


def questions(test_annotations: Sequence[dict], seed: int = 0) -> dict[str, list[dict]]:
  """The held-out question sets: short-answer QA of every type and the three POPE splits."""
  out = {"qa": instruct_engine.make_eval_questions(list(test_annotations), seed)}
  for split in instruct_engine.POPE_SPLITS:
    out[f"pope_{split}"] = instruct_engine.make_pope_questions(list(test_annotations), split, seed)
  return out


def accuracy_by_reference(qa: Sequence[dict], answers: Sequence[str]) -> dict:
  """Color and shape accuracy by how the question names its object: by the other attribute
  alone ("the star") or with its size too ("the small star": a lookup by two attributes, which
  the demo model gets wrong far more often). `qa` are the engine's eval questions (with `args`)."""
  out = {}
  for qtype in REFERENCE_TYPES:
    groups = {"one_attribute": [], "with_size": []}
    for q, a in zip(qa, answers):
      if q["qtype"] == qtype:
        groups["with_size" if "size" in q["args"]["ref"] else "one_attribute"].append(dict(q, prediction=a))
    out[qtype] = {name: {"accuracy": scoring.accuracy_by_type(records).get(qtype, float("nan")),
                         "count": len(records)} for name, records in groups.items()}
  return out


def score(sets: dict[str, list[dict]], answers: dict[str, list[str]]) -> dict:
  qa = [dict(q, prediction=a) for q, a in zip(sets["qa"], answers["qa"])]
  by_type = scoring.accuracy_by_type(qa)
  result = {"accuracy": {t: by_type.get(t, float("nan")) for t in QA_TYPES}, "pope": {}}
  for split in instruct_engine.POPE_SPLITS:
    qs = sets[f"pope_{split}"]
    result["pope"][split] = pope.metrics(answers[f"pope_{split}"], [q["answer"] for q in qs])
  return result


def _prompt(q: dict, blind: bool) -> tuple[str, str | None]:
  return q["question"], None if blind else q["image"]


def distinct_prompts(sets: dict[str, list[dict]]) -> list[tuple[str, str | None]]:
  """Every (question, image path) to ask, the image None for the blind ablation, each once:
  POPE's "yes" questions repeat across its three splits and a blind question is the same prompt
  for every image (on the demo's 400 held-out images, 14,234 questions are 5,349 prompts)."""
  return list(dict.fromkeys(_prompt(q, blind) for blind in (False, True) for qs in sets.values() for q in qs))


def evaluate(session, image_folder: str, sets: dict[str, list[dict]], *, num_examples: int = 4,
             progress: Callable[[int], None] | None = None, seed: int = 0) -> dict:
  """Per-type accuracy, POPE per split, the same with blank images, and a few examples, on the
  question sets of `questions`. `progress` is called with the number of prompts just answered
  (see distinct_prompts)."""
  return summarize(sets, ask(session, image_folder, sets, progress=progress, seed=seed), image_folder, num_examples)


def ask(session, image_folder: str, sets: dict[str, list[dict]], *, progress: Callable[[int], None] | None = None,
        seed: int = 0) -> dict[bool, dict[str, list[str]]]:
  """{blind: {set name: the replies to its questions}}, each distinct prompt asked once."""
  asker = Asker(session, image_folder)
  # Asked in random order, so every batch has about the same longest prompt and the engine
  # compiles a single shape.
  prompts = distinct_prompts(sets)
  order = np.random.default_rng(seed).permutation(len(prompts))
  replies = dict(zip((prompts[k] for k in order), asker.ask([prompts[k] for k in order], progress)))
  return {blind: {name: [replies[_prompt(q, blind)] for q in qs] for name, qs in sets.items()}
          for blind in (False, True)}


def summarize(sets: dict[str, list[dict]], answers: dict[bool, dict[str, list[str]]], image_folder: str,
              num_examples: int = 4) -> dict:
  """The results of `evaluate` from the replies of `ask`."""
  seen, blind = score(sets, answers[False]), score(sets, answers[True])
  result = {"accuracy": seen["accuracy"], "blind_accuracy": blind["accuracy"],
            "pope": seen["pope"], "blind_pope": blind["pope"],
            "accuracy_by_reference": accuracy_by_reference(sets["qa"], answers[False]["qa"])}
  result["headline"] = {
      "accuracy": scoring.mean([seen["accuracy"][t] for t in HEADLINE_TYPES]),
      "blind_accuracy": scoring.mean([blind["accuracy"][t] for t in HEADLINE_TYPES])}
  result["examples"] = examples(sets["qa"], answers[False]["qa"], image_folder, num_examples)
  result["counts"] = {name: len(qs) for name, qs in sets.items()}
  return result


def examples(qa: Sequence[dict], answers: Sequence[str], folder: str, n: int) -> list[dict]:
  """The first `n` QA items of distinct types: image, question, model answer, truth."""
  out, types = [], set()
  for q, a in zip(qa, answers):
    if q["qtype"] not in types and len(out) < n:
      types.add(q["qtype"])
      out.append({"image": os.path.join(folder, q["image"]), "question": q["question"], "answer": a,
                  "truth": q["answer"], "qtype": q["qtype"]})
  return out


def describe(session, image_folder: str, annotation: dict, seed: int = 0, max_new_tokens: int = 120) -> dict:
  """The model's detailed description of one held-out image next to the engine's true one."""
  question = instruct_engine.DETAIL_PROMPTS[0]
  truth = instruct_engine.build_samples([annotation], instruct_engine.WRITERS["detail"], seed)[0]
  answer = Asker(session, image_folder).ask([(question, annotation["image"])], max_new_tokens=max_new_tokens)[0]
  return {"image": os.path.join(image_folder, annotation["image"]), "question": question, "answer": answer,
          "truth": truth["conversations"][1]["value"], "qtype": "detail"}
