"""POPE (Li et al., 2023, "Evaluating Object Hallucination in Large Vision-Language Models").

Questions "Is there a/an OBJECT in the image?" with "yes" for objects present and "no" for
objects sampled as negatives (random, popular or adversarial). An answer counts as "no" when
its first sentence contains the word "no" or "not" (the rule of POPE's and LLaVA's eval_pope.py,
which split words at spaces and check "No", "no", "not"; here any case and punctuation), otherwise "yes".
Metrics treat "yes" as the positive class: accuracy, precision, recall, F1 and the yes-ratio
(fraction of "yes" answers; 0.5 is unbiased on POPE's balanced splits).
"""

from __future__ import annotations

from typing import Sequence

from llava_jax.eval.scoring import words

METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def parse_yes_no(answer: str) -> str:
  first_sentence = str(answer).split(".")[0]
  return "no" if {"no", "not"} & set(words(first_sentence)) else "yes"


def metrics(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """POPE metrics of free-form `answers` against "yes"/"no" `labels`."""
  if len(answers) != len(labels):
    raise ValueError(f"{len(answers)} answers but {len(labels)} labels")
  pred = [parse_yes_no(a) == "yes" for a in answers]
  gold = [str(l).strip().lower() == "yes" for l in labels]
  tp = sum(p and g for p, g in zip(pred, gold))
  fp = sum(p and not g for p, g in zip(pred, gold))
  fn = sum(g and not p for p, g in zip(pred, gold))
  n = max(1, len(gold))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": sum(p == g for p, g in zip(pred, gold)) / n, "precision": precision,
          "recall": recall, "f1": f1, "yes_ratio": sum(pred) / n}
