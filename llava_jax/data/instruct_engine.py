"""The instruction-data engine: LLaVA's data idea, made offline, over ShapesWorld annotations.

LLaVA gave GPT-4 only the *text* of COCO annotations (captions and boxes) and had it write three
kinds of data about images it never saw: multi-turn conversations, detailed descriptions and
complex reasoning. Here deterministic templates play GPT-4's part, behind `InstructionWriter`,
so a language model can be plugged in later. Everything reads annotation dicts only, never pixels.

Output is LLaVA JSON: `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}],
"meta"}`. `meta` (ignored by loaders) holds the kind and, per gpt turn, the question type, its
structured arguments and the canonical short answer, so answers can be checked and scored.
QA answers are canonical single words ("red", "circle", "3", "left", "yes") for scoring. Color,
shape and existence replies restate what was asked before deciding ("The star is red.", "A red
star? ..."): the reply's decision word then follows the words that name the object, which a small
language model learns to bind to the image far more easily than a bare "yes" or "red" right after
the question (measured in a study of the demo's recipe, with ideal image features: existence
80% -> 89%). An existence reply also looks up the named shape's colors before deciding ("A red
star? The star is blue. No."): the lookup color answers train, then a comparison of words
(demo: existence 57% -> 80%). `ANSWER_WORDS` lists the decision words scorers look for in a reply.

Geometry words (all from boxes `[x, y, w, h]`, image `width` x `height`):
- half (position questions): "left" iff x + w <= width / 2, "right" iff x >= width / 2; same
  with y/h for "top"/"bottom"; an object across the middle line is never asked about.
- region (descriptions): the 3x3 grid cell of the box center.
"""

import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from llava_jax.data.shapes import (BACKGROUNDS, COLORS, NUMBER_WORDS, SHAPES, _write_json_atomic, join_words,
                                   load_annotations)
from llava_jax.errors import LlavaJaxError

IMAGE = "<image>"
QA_TYPES = ("color", "shape", "count", "position", "existence")
REASONING_TYPES = ("closest", "remain", "compare", "relation", "extreme")
KINDS = ("caption", "conversation", "detail", "reasoning")
POPE_SPLITS = ("random", "popular", "adversarial")
ANSWER_WORDS = {"color": tuple(COLORS), "shape": SHAPES, "existence": ("yes", "no"),
                "position": ("left", "right", "top", "bottom"), "count": tuple(str(i) for i in range(10))}

# LLaVA's own instruction lists (brief: stage-1 pretraining; detailed: LLaVA-Instruct).
BRIEF_PROMPTS = (
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.")
DETAIL_PROMPTS = (
    "Describe the following image in detail.", "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.")


@dataclass
class QA:
  """One question and its answer; `answer` is canonical, `reply` the gpt text (default: answer)."""
  question: str
  answer: str
  qtype: str
  args: dict = field(default_factory=dict)
  reply: str = ""

  def turns(self) -> list[dict]:
    return [{"from": "human", "value": self.question},
            {"from": "gpt", "value": self.reply or self.answer,
             "qtype": self.qtype, "args": self.args, "answer": self.answer}]


class InstructionWriter(Protocol):
  """Writes one sample's turns from one annotation (text only). Extra keys on gpt turns
  (qtype, args, answer) go to the sample's `meta`; return None to skip the image."""
  kind: str

  def write(self, annotation: dict, rng: np.random.Generator) -> list[dict] | None: ...


# ---------------------------------------------------------------- annotation helpers


def _pick(rng, items):
  return items[rng.integers(len(items))]


def _match(obj: dict, attrs: dict) -> bool:
  return all(obj[k] == v for k, v in attrs.items())


def _count(objects: list[dict], attrs: dict) -> int:
  return sum(_match(o, attrs) for o in objects)


def _phrase(attrs: dict, n: int = 1) -> str:
  """{"color": "red"} -> "red object(s)"; {"size": "large", "shape": "star"} -> "large star(s)"."""
  words = [attrs[k] for k in ("size", "color") if k in attrs]
  noun = attrs.get("shape", "object")
  return " ".join(words + [noun + ("s" if n != 1 else "")])


def _a(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _key(obj: dict) -> dict:
  return {"color": obj["color"], "shape": obj["shape"]}


def _name(obj: dict) -> str:
  return f"{obj['color']} {obj['shape']}"


def _refs(objects: list[dict], keys_options) -> list[tuple[dict, dict]]:
  """(object, attrs) pairs where attrs (the first of `keys_options` that works) name exactly
  one object: the referring expressions a question can use unambiguously."""
  out = []
  for obj in objects:
    for keys in keys_options:
      attrs = {k: obj[k] for k in keys}
      if _count(objects, attrs) == 1:
        out.append((obj, attrs))
        break
  return out


def _half(obj: dict, ann: dict, axis: str) -> str | None:
  x, y, w, h = obj["bbox"]
  lo, extent, limit = (x, w, ann["width"] / 2) if axis == "x" else (y, h, ann["height"] / 2)
  words = ("left", "right") if axis == "x" else ("top", "bottom")
  return words[0] if lo + extent <= limit else words[1] if lo >= limit else None


def _region(obj: dict, ann: dict) -> str:
  """"top left", "top center", ..., "center", ..., "bottom right"."""
  col = ("left", "center", "right")[min(2, int(3 * obj["center"][0] / ann["width"]))]
  row = ("top", "middle", "bottom")[min(2, int(3 * obj["center"][1] / ann["height"]))]
  return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def _vocab(annotations=()) -> list[tuple[str, str]]:
  """All color-shape combinations: the object vocabulary of existence and POPE questions."""
  seen = [o for a in annotations for o in a["objects"]]
  colors = list(COLORS) + sorted({o["color"] for o in seen} - set(COLORS))
  shapes = list(SHAPES) + sorted({o["shape"] for o in seen} - set(SHAPES))
  return [(c, s) for c in colors for s in shapes]


# ---------------------------------------------------------------- QA askers (one per type)


def _ask_attribute(ann, rng, qtype: str) -> QA | None:
  """"What color is the star?" -> "The star is red." / "What shape is the red object?" -> "A red
  star.": the object is named by the other attribute, plus its size when that alone is ambiguous.

  Either reply puts the word the object is looked up by right before the answer word, where a
  small LM's attention can use it to find the object: with "The red object is a star." the
  demo's LM spread its image attention over every object (in scenes of 3-4 objects, 0.26 on the
  asked one, 0.57 on the others) and answered shape 80% right; with "A red star." it put 0.72 on
  the asked one (98% on one-attribute lookups). See benchmarks/demo.md."""
  other = "shape" if qtype == "color" else "color"
  refs = _refs(ann["objects"], [(other,), ("size", other)])
  if not refs:
    return None
  obj, attrs = _pick(rng, refs)
  q = _pick(rng, (f"What {qtype} is the {{}}?", f"What is the {qtype} of the {{}}?",
                  f"Which {qtype} does the {{}} have?")).format(_phrase(attrs))
  reply = (f"The {_phrase(attrs)} is {obj['color']}." if qtype == "color" else
           _a(_phrase(dict(attrs, shape=obj["shape"]))).capitalize() + ".")
  return QA(q, obj[qtype], qtype, {"ref": attrs}, reply)


def _ask_count(ann, rng) -> QA | None:
  objects = ann["objects"]
  # Mostly colors/shapes that are present; sometimes absent ones, so "0" is a real answer.
  color = _pick(rng, objects)["color"] if rng.random() < 0.8 else _pick(rng, list(COLORS))
  shape = _pick(rng, objects)["shape"] if rng.random() < 0.8 else _pick(rng, SHAPES)
  attrs = _pick(rng, ({}, {"color": color}, {"shape": shape}, {"color": color, "shape": shape}))
  q = _pick(rng, ("How many {} are there?", "How many {} are in the image?",
                  "How many {} can you see?")).format(_phrase(attrs, 2))
  return QA(q, str(_count(objects, attrs)), "count", {"of": attrs})


def _ask_position(ann, rng) -> QA | None:
  options = [(obj, attrs, axis) for obj, attrs in
             _refs(ann["objects"], [("color", "shape"), ("shape",), ("color",)])
             for axis in ("x", "y") if _half(obj, ann, axis)]
  if not options:
    return None
  obj, attrs, axis = _pick(rng, options)
  templates = (("Is the {} on the left or the right side of the image?",
                "Is the {} in the left half or the right half of the image?",
                "On which side of the image is the {}, left or right?") if axis == "x" else
               ("Is the {} in the top half or the bottom half of the image?",
                "Is the {} near the top or the bottom of the image?",
                "Which half of the image is the {} in, top or bottom?"))
  return QA(_pick(rng, templates).format(_phrase(attrs)), _half(obj, ann, axis), "position",
            {"ref": attrs, "axis": axis})


def _ask_existence(ann, rng, want_yes: bool | None = None) -> QA | None:
  present = {(o["color"], o["shape"]) for o in ann["objects"]}
  if want_yes is None:
    want_yes = rng.random() < 0.5
  if want_yes:
    color, shape = _pick(rng, sorted(present))
  else:
    absent = [v for v in _vocab() if v not in present]
    # Half the negatives share a color or a shape with a present object: they teach binding.
    hard = [v for v in absent if any(v[0] == c or v[1] == s for c, s in present)]
    color, shape = _pick(rng, hard if hard and rng.random() < 0.5 else absent)
  name = _a(f"{color} {shape}")
  q = _pick(rng, ("Is there {} in the image?", "Do you see {}?", "Does the image contain {}?",
                  "Can you find {} in the picture?")).format(name)
  reply = f"{name.capitalize()}? {_shape_colors(ann, shape)} {'Yes' if want_yes else 'No'}."
  return QA(q, "yes" if want_yes else "no", "existence", {"color": color, "shape": shape}, reply)


def _shape_colors(ann, shape: str) -> str:
  """"The star is blue." / "The stars are blue and red." / "There is no star.": the lookup an
  existence decision rests on, phrased as the color answers are, so both train one skill."""
  same = [o for o in sorted(ann["objects"], key=lambda o: o["center"]) if o["shape"] == shape]
  if not same:
    return f"There is no {shape}."
  colors = list(dict.fromkeys(o["color"] for o in same))
  return f"The {shape}{'s are' if len(same) > 1 else ' is'} {join_words(colors)}."


ASKERS = {"color": lambda ann, rng: _ask_attribute(ann, rng, "color"),
          "shape": lambda ann, rng: _ask_attribute(ann, rng, "shape"), "count": _ask_count,
          "position": _ask_position, "existence": _ask_existence}


# ---------------------------------------------------------------- complex reasoning


def _named(objects):
  """Objects whose color+shape name is unique, so an answer can name them."""
  return [o for o in objects if _count(objects, {"color": o["color"], "shape": o["shape"]}) == 1]


def _dist(a, b) -> float:
  return float(np.hypot(a["center"][0] - b["center"][0], a["center"][1] - b["center"][1]))


def _reason_closest(ann, rng) -> QA | None:
  objects, options = ann["objects"], []
  for ref in _named(objects):
    others = sorted((o for o in objects if o is not ref), key=lambda o: _dist(ref, o))
    # Clear winner only (25% nearer than the runner-up), and nameable.
    if len(others) >= 2 and _dist(ref, others[1]) >= 1.25 * _dist(ref, others[0]) + 1 \
        and others[0] in _named(objects):
      options.append((ref, others[0]))
  if not options:
    return None
  ref, best = _pick(rng, options)
  q = _pick(rng, ("Which object is closest to the {}?", "What is the nearest object to the {}?",
                  "Which object lies nearest to the {}?")).format(_name(ref))
  reply = (f"The {best['size']} {_name(best)} is the closest to the {_name(ref)}: it is in the "
           f"{_region(best, ann)} of the image, and every other object is farther away.")
  return QA(q, _name(best), "closest", {"ref": _key(ref)}, reply)


def _reason_remain(ann, rng) -> QA | None:
  objects = ann["objects"]
  key = _pick(rng, ("color", "shape"))
  attrs = {key: _pick(rng, objects)[key]}
  n, m = len(objects), _count(objects, attrs)
  q = _pick(rng, ("How many objects would remain if all the {} were removed?",
                  "If every one of the {} were taken away, how many objects would be left?"))
  what = (f"{'is' if m == 1 else 'are'} {attrs['color']}" if key == "color" else
          f"is a {attrs['shape']}" if m == 1 else f"are {attrs['shape']}s")
  reply = (f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{'s' if n > 1 else ''} in "
           f"total, and {NUMBER_WORDS[m]} of them {what}. Removing {'it' if m == 1 else 'them'} "
           f"would leave {n - m}.")
  return QA(q.format(_phrase(attrs, 2)), str(n - m), "remain", {"of": attrs}, reply)


def _reason_compare(ann, rng) -> QA | None:
  objects = ann["objects"]
  key = _pick(rng, ("color", "shape"))
  first = _pick(rng, objects)[key]
  second = _pick(rng, [v for v in (COLORS if key == "color" else SHAPES) if v != first])
  a, b = {key: first}, {key: second}
  na, nb = _count(objects, a), _count(objects, b)
  q = f"Are there more {_phrase(a, 2)} than {_phrase(b, 2)} in the image?"
  counts = f"{NUMBER_WORDS[na]} {_phrase(a, na)} and {NUMBER_WORDS[nb]} {_phrase(b, nb)}"
  reply = (f"Yes. There {'is' if na == 1 else 'are'} {counts}." if na > nb else
           f"No. There {'is' if na == 1 else 'are'} {counts}, so the {_phrase(a, 2)} are not "
           f"more numerous.")
  return QA(q, "yes" if na > nb else "no", "compare", {"a": a, "b": b}, reply)


_REL = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def _relation(a, b) -> list[str]:
  """Relations of box a to box b that hold strictly (the boxes do not overlap on that axis)."""
  (ax, ay, aw, ah), (bx, by, bw, bh) = a["bbox"], b["bbox"]
  return [r for r, ok in (("left", ax + aw <= bx), ("right", bx + bw <= ax),
                          ("above", ay + ah <= by), ("below", by + bh <= ay)) if ok]


def _reason_relation(ann, rng) -> QA | None:
  named = _named(ann["objects"])
  pairs = [(a, b) for a in named for b in named if a is not b and _relation(a, b)]
  if not pairs:
    return None
  a, b = _pick(rng, pairs)
  true = _relation(a, b)
  axis = _pick(rng, [("left", "right") if r in ("left", "right") else ("above", "below")
                     for r in true])
  asked = _pick(rng, axis)
  holds = asked in true
  actual = asked if holds else next(r for r in true if r in axis)
  q = f"Is the {_name(a)} {_REL[asked]} the {_name(b)}?"
  reply = f"{'Yes' if holds else 'No'}, the {_name(a)} is {_REL[actual]} the {_name(b)}."
  return QA(q, "yes" if holds else "no", "relation",
            {"a": _key(a), "b": _key(b), "rel": asked}, reply)


_EXTREMES = {  # direction -> (question words, key of the center, key of the near box edge)
    "left": ("the furthest to the left", lambda o: o["center"][0], lambda o: o["bbox"][0]),
    "right": ("the furthest to the right", lambda o: -o["center"][0],
              lambda o: -o["bbox"][0] - o["bbox"][2]),
    "top": ("closest to the top of the image", lambda o: o["center"][1], lambda o: o["bbox"][1]),
    "bottom": ("closest to the bottom of the image", lambda o: -o["center"][1],
               lambda o: -o["bbox"][1] - o["bbox"][3]),
}


def _extreme_winner(objects, direction):
  """The object that is extreme by its center (3 px margin) and by its near edge alike."""
  _, by_center, by_edge = _EXTREMES[direction]
  ranked = sorted(objects, key=by_center)
  if len(ranked) < 2 or by_center(ranked[1]) - by_center(ranked[0]) < 3:
    return None
  return ranked[0] if all(by_edge(ranked[0]) < by_edge(o) for o in ranked[1:]) else None


def _reason_extreme(ann, rng) -> QA | None:
  options = [(d, w) for d in _EXTREMES if (w := _extreme_winner(ann["objects"], d))
             and w in _named(ann["objects"])]
  if not options:
    return None
  direction, win = _pick(rng, options)
  words = _EXTREMES[direction][0]
  reply = f"The {win['size']} {_name(win)} is {words}, in the {_region(win, ann)} of the image."
  return QA(f"Which object is {words}?", _name(win), "extreme", {"dir": direction}, reply)


REASONERS = {"closest": _reason_closest, "remain": _reason_remain, "compare": _reason_compare,
             "relation": _reason_relation, "extreme": _reason_extreme}


# ---------------------------------------------------------------- the template writers


class CaptionWriter:
  """Stage 1 (LLaVA-pretrain style): a brief-description instruction, answered by the caption."""
  kind = "caption"

  def write(self, ann, rng):
    return [{"from": "human", "value": _pick(rng, BRIEF_PROMPTS)},
            {"from": "gpt", "value": ann["caption"], "qtype": "caption"}]


class ConversationWriter:
  """3-5 short QA turns about one image, in random order: a contrasting existence pair (an
  object that is there and one that is not) and 1-3 of the other types."""
  kind = "conversation"

  def write(self, ann, rng):
    want, chosen, seen = rng.integers(3, 6), [], set()
    others = [q for q in QA_TYPES if q != "existence"]
    pair = [_ask_existence(ann, rng, want_yes=True), _ask_existence(ann, rng, want_yes=False)]
    mixed = [ASKERS[str(q)](ann, rng) for q in [*rng.permutation(others), *rng.permutation(others)]]
    for qa in pair + mixed:
      if qa and qa.question not in seen:
        seen.add(qa.question)
        chosen.append(qa)
      if len(chosen) == want:
        break
    return [t for i in rng.permutation(len(chosen)) for t in chosen[i].turns()] or None


class DetailWriter:
  """A paragraph naming every object with its size, color, shape and region, plus relations."""
  kind = "detail"

  def write(self, ann, rng):
    objects = sorted(ann["objects"], key=lambda o: (o["center"][0], o["center"][1]))
    n = len(objects)
    where = f" on {BACKGROUNDS[ann['background']]}" if ann.get("background") in BACKGROUNDS else ""
    text = [f"The image shows {NUMBER_WORDS[n]} object{'s' if n > 1 else ''}{where}."]
    for i, o in enumerate(objects):
      lead = (_pick(rng, ("Next comes", "Then there is", "After it there is")) if i else
              "From left to right, there is" if n > 1 else "There is")
      text.append(f"{lead} a {o['size']} {_name(o)} in the {_region(o, ann)} of the image.")
    colors = Counter(o["color"] for o in objects)
    text += [f"{NUMBER_WORDS[k].capitalize()} of the objects are {c}."
             for c, k in colors.items() if k > 1]
    named = _named(objects)
    pairs = [(a, b, r) for a in named for b in named if a is not b for r in _relation(a, b)[:1]]
    if pairs:
      a, b, r = _pick(rng, pairs)
      text.append(f"The {_name(a)} is {_REL[r]} the {_name(b)}.")
    return [{"from": "human", "value": _pick(rng, DETAIL_PROMPTS)},
            {"from": "gpt", "value": " ".join(text), "qtype": "detail"}]


class ReasoningWriter:
  """One or two questions that need several objects and their relations, answered with reasons."""
  kind = "reasoning"

  def write(self, ann, rng):
    want, turns = 1 + (rng.random() < 0.3), []
    for qtype in rng.permutation(REASONING_TYPES):
      qa = REASONERS[str(qtype)](ann, rng)
      if qa:
        turns += qa.turns()
      if len(turns) == 2 * want:
        break
    return turns or None


WRITERS = {w.kind: w for w in
           (CaptionWriter(), ConversationWriter(), DetailWriter(), ReasoningWriter())}


# ---------------------------------------------------------------- datasets


def _rng(seed: int, purpose: str, ann_id: str) -> np.random.Generator:
  """A generator per (seed, purpose, image): results do not depend on annotation order."""
  return np.random.default_rng(
      [seed, zlib.crc32(purpose.encode()), zlib.crc32(str(ann_id).encode())])


def build_samples(annotations: list[dict], writer: InstructionWriter, seed: int = 0,
                  per_image: int = 1) -> list[dict]:
  """LLaVA samples from one writer: `per_image` per annotation, each written with its own
  random stream (a writer that returns None for an image is skipped)."""
  samples = []
  for copy in range(per_image):
    suffix = f"-{copy}" if copy else ""  # copy 0 keeps the single-sample ids and streams
    for ann in annotations:
      turns = writer.write(ann, _rng(seed, writer.kind + suffix, ann["id"]))
      if not turns:
        continue
      conv = [{"from": t["from"], "value": t["value"]} for t in turns]
      if IMAGE not in conv[0]["value"]:
        conv[0]["value"] = f"{IMAGE}\n{conv[0]['value']}"
      meta = [{k: t.get(k) for k in ("qtype", "args", "answer")} for t in turns if t["from"] == "gpt"]
      samples.append({"id": f"{ann['id']}-{writer.kind}{suffix}", "image": ann["image"],
                      "conversations": conv, "meta": {"kind": writer.kind, "turns": meta}})
  return samples


def make_caption_set(annotations: list[dict], seed: int = 0) -> list[dict]:
  """Stage-1 data: one brief-caption sample per image."""
  return build_samples(annotations, WRITERS["caption"], seed)


def make_instruct_set(annotations: list[dict], seed: int = 0,
                      kinds=("conversation", "detail", "reasoning"), writers=None,
                      per_image: dict[str, int] | None = None) -> list[dict]:
  """Stage-2 data: per image, `per_image[kind]` samples of each kind (default one; fewer when
  a writer has nothing to say about an image), shuffled by `seed`."""
  writers = writers or [WRITERS[k] for k in kinds]
  per_image = per_image or {}
  samples = [s for w in writers for s in build_samples(annotations, w, seed, per_image.get(w.kind, 1))]
  order = np.random.default_rng(seed).permutation(len(samples))
  return [samples[i] for i in order]


def make_eval_questions(annotations: list[dict], seed: int = 0, qtypes=QA_TYPES) -> list[dict]:
  """Held-out questions, up to one per type per image: `{"id", "image", "question" (user text,
  without <image>), "answer" (the truth), "qtype", "args", "choices" (the type's possible
  answers, for decision-word scoring)}`. Existence is exactly 50/50."""
  out, n_exist = [], 0
  for ann in annotations:
    rng = _rng(seed, "eval", ann["id"])
    for qtype in qtypes:
      if qtype == "existence":
        qa, n_exist = _ask_existence(ann, rng, want_yes=n_exist % 2 == 0), n_exist + 1
      else:
        qa = ASKERS[qtype](ann, rng)
      if qa:
        out.append({"id": f"{ann['id']}-{qtype}", "image": ann["image"], "question": qa.question,
                    "answer": qa.answer, "qtype": qtype, "args": qa.args,
                    "choices": list(ANSWER_WORDS[qtype])})
  return out


def make_pope_questions(annotations: list[dict], split: str, seed: int = 0) -> list[dict]:
  """POPE probing: per image, every present color-shape object (answer "yes") and as many absent
  ones (answer "no"), chosen by `split`: random (uniform over absent objects), popular (the
  dataset's most frequent objects) or adversarial (the objects that co-occur most often with
  the present ones). Frequencies come from `annotations`. Exactly half the answers are "yes"."""
  if split not in POPE_SPLITS:
    raise LlavaJaxError(f"pope: unknown split {split!r}; expected one of {list(POPE_SPLITS)}")
  present_sets = [sorted({(o["color"], o["shape"]) for o in a["objects"]}) for a in annotations]
  freq = Counter(v for s in present_sets for v in s)
  co = Counter((p, v) for s in present_sets for p in s for v in s if p != v)
  vocab = _vocab(annotations)
  out = []
  for ann, present in zip(annotations, present_sets):
    rng = _rng(seed, "pope-" + split, ann["id"])
    absent = [v for v in vocab if v not in present]
    tie = dict(zip(absent, rng.random(len(absent))))  # random order among equals
    score = {"random": lambda v: 0,
             "popular": lambda v: -freq[v],
             "adversarial": lambda v: -sum(co[(p, v)] for p in present)}[split]
    negatives = sorted(absent, key=lambda v: (score(v), tie[v]))[:len(present)]
    for (color, shape), answer in [(v, "yes") for v in present] + [(v, "no") for v in negatives]:
      out.append({"id": f"{ann['id']}-pope-{split}-{color}-{shape}", "image": ann["image"],
                  "question": f"Is there {_a(f'{color} {shape}')} in the image?", "answer": answer,
                  "qtype": "existence", "object": f"{color} {shape}", "split": split})
  return out


def write_llava_json(samples: list[dict], path) -> Path:
  """Write samples as one LLaVA JSON file (atomically)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_json_atomic(samples, path)
  return path


def write_datasets(folder, split: str = "train", seed: int = 0,
                   per_image: dict[str, int] | None = None) -> dict[str, Path]:
  """From FOLDER/SPLIT.json (written by `shapes.write_world`), write the stage-1 caption set
  FOLDER/SPLIT_caption.json and the stage-2 set FOLDER/SPLIT_instruct.json; image paths stay
  relative to FOLDER. Reads no image."""
  folder = Path(folder)
  annotations = load_annotations(folder / f"{split}.json")
  sets = {"caption": make_caption_set(annotations, seed),
          "instruct": make_instruct_set(annotations, seed, per_image=per_image)}
  return {k: write_llava_json(v, folder / f"{split}_{k}.json") for k, v in sets.items()}
