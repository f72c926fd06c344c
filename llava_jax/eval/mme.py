"""MME (Fu et al., 2023): yes/no questions, two per image, in 10 perception and 4 cognition subtasks.

As MME's eval_tool/calculation.py: an answer is "yes"/"no" when it is exactly that (lower-cased),
else the one of them found in its first 4 characters ("Yes, it is" -> yes), else "other" (wrong).
A subtask's score is accuracy + accuracy+ (both in percent; accuracy+ is the fraction of images
whose two questions are both right), at most 200; perception and cognition sum their subtasks.
"""

from __future__ import annotations

import collections
from typing import Iterable, Mapping

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_answer(answer: str) -> str:
  text = str(answer).strip().lower()
  if text in ("yes", "no"):
    return text
  prefix = text[:4]
  return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def metrics(records: Iterable[Mapping]) -> dict:
  """Records with "category", "image", "prediction" and "answer" (yes/no) -> the MME scores.

  Only the subtasks present are scored; perception and cognition sum those present.
  """
  images: dict[str, dict[str, list[bool]]] = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in records:
    images[r["category"]][r["image"]].append(parse_answer(r["prediction"]) == str(r["answer"]).strip().lower())
  subtasks = {}
  for category, by_image in images.items():
    hits = [h for pair in by_image.values() for h in pair]
    accuracy = 100 * sum(hits) / len(hits)
    accuracy_plus = 100 * sum(all(pair) for pair in by_image.values()) / len(by_image)
    subtasks[category] = {"accuracy": accuracy, "accuracy_plus": accuracy_plus, "score": accuracy + accuracy_plus}
  total = lambda group: sum(subtasks[c]["score"] for c in group if c in subtasks)
  return {"perception": total(PERCEPTION), "cognition": total(COGNITION), "subtasks": subtasks}
