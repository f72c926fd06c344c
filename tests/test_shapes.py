"""ShapesWorld and the instruction-data engine: determinism, disjoint splits, annotations true of
the pixels, every generated answer true of the boxes (re-derived here, independently of the
engine's helpers), POPE sampling, and valid LLaVA JSON."""

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import instruct_engine as ie
from llava_jax.data import shapes
from llava_jax.eval import scoring
from llava_jax.errors import LlavaJaxError

N_TRAIN, N_TEST = 200, 120


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  folder = tmp_path_factory.mktemp("world")
  train = shapes.write_world(folder, "train", N_TRAIN, seed=0)
  test = shapes.write_world(folder, "test", N_TEST, seed=0)
  return folder, train, test


@pytest.fixture(scope="module")
def annotations():
  """More scenes, all three image sizes, in memory (the engine needs no files)."""
  return [{"image": f"mem/{s}.png", **shapes.render(s, (48, 64, 96)[s % 3])[1]}
          for s in range(10_000, 10_800)]


@pytest.fixture(scope="module")
def instruct(annotations):
  return ie.make_instruct_set(annotations, seed=0)


# ---------------------------------------------------------------- independent truth


def _box(o):
  return o["bbox"]


def _center(o):
  x, y, w, h = o["bbox"]
  return x + w / 2, y + h / 2


def _with(ann, attrs):
  return [o for o in ann["objects"] if all(o[k] == v for k, v in (attrs or {}).items())]


def _the(ann, attrs):
  """The one object `attrs` refer to; a question about an ambiguous referent is a bug."""
  found = _with(ann, attrs)
  assert len(found) == 1, f"ambiguous referent {attrs} in {ann['id']}"
  return found[0]


def _nameable(ann, o):
  return len(_with(ann, {"color": o["color"], "shape": o["shape"]})) == 1


def _half(ann, o, axis):
  x, y, w, h = _box(o)
  if axis == "x":
    return "left" if x + w <= ann["width"] / 2 else "right" if x >= ann["width"] / 2 else None
  return "top" if y + h <= ann["height"] / 2 else "bottom" if y >= ann["height"] / 2 else None


def _holds(a, b, rel):
  (ax, ay, aw, ah), (bx, by, bw, bh) = _box(a), _box(b)
  return {"left": ax + aw <= bx, "right": bx + bw <= ax,
          "above": ay + ah <= by, "below": by + bh <= ay}[rel]


def _truth(ann, qtype, args):
  """The answer re-derived from the boxes and attributes."""
  if qtype == "color":
    return _the(ann, args["ref"])["color"]
  if qtype == "shape":
    return _the(ann, args["ref"])["shape"]
  if qtype in ("count", "remain"):
    n = len(_with(ann, args["of"]))
    return str(n if qtype == "count" else len(ann["objects"]) - n)
  if qtype == "position":
    side = _half(ann, _the(ann, args["ref"]), args["axis"])
    assert side, f"position asked about an object across the middle in {ann['id']}"
    return side
  if qtype == "existence":
    return "yes" if _with(ann, args) else "no"
  if qtype == "compare":
    return "yes" if len(_with(ann, args["a"])) > len(_with(ann, args["b"])) else "no"
  if qtype == "relation":
    a, b = _the(ann, args["a"]), _the(ann, args["b"])
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}[args["rel"]]
    assert _holds(a, b, args["rel"]) or _holds(a, b, opposite), "relation of overlapping boxes"
    return "yes" if _holds(a, b, args["rel"]) else "no"
  if qtype == "closest":
    ref = _the(ann, args["ref"])
    others = sorted((o for o in ann["objects"] if o is not ref),
                    key=lambda o: np.hypot(*np.subtract(_center(o), _center(ref))))
    assert _nameable(ann, others[0])
    return f"{others[0]['color']} {others[0]['shape']}"
  if qtype == "extreme":
    edge = {"left": lambda b: b[0], "right": lambda b: -(b[0] + b[2]),
            "top": lambda b: b[1], "bottom": lambda b: -(b[1] + b[3])}[args["dir"]]
    win, runner_up = sorted(ann["objects"], key=lambda o: edge(o["bbox"]))[:2]
    assert edge(win["bbox"]) < edge(runner_up["bbox"]) and _nameable(ann, win)
    return f"{win['color']} {win['shape']}"
  raise AssertionError(f"unknown qtype {qtype}")


def _looked_up_colors(reply, shape):
  """The colors an existence reply's middle sentence gives the shape ("There is no star." -> none)."""
  sentence = reply.split("? ", 1)[1].rsplit(". ", 1)[0]
  if sentence == f"There is no {shape}":
    return set()
  lead = re.match(rf"The {shape}(?: is|s are) ", sentence)
  assert lead, reply
  return set(re.split(r", | and ", sentence[lead.end():]))


_RELATION = re.compile(  # the relation sentence of a detailed description
    r"The (\w+) (\w+) is (to the left of|to the right of|above|below) the (\w+) (\w+)\.")


def _arg_words(args):
  """Every attribute value the question must mention."""
  if isinstance(args, dict):
    return [w for k, v in args.items() if k not in ("axis", "dir", "rel") for w in _arg_words(v)]
  return [args]


# ---------------------------------------------------------------- the world


def test_render_is_deterministic_and_seeds_differ():
  img1, ann1 = shapes.render(12345, 64)
  img2, ann2 = shapes.render(12345, 64)
  assert ann1 == ann2 and np.array_equal(np.asarray(img1), np.asarray(img2))
  img3, _ = shapes.render(12346, 64)
  assert not np.array_equal(np.asarray(img1), np.asarray(img3))
  for size in (48, 96):
    img, ann = shapes.render(7, size)
    assert img.size == (size, size) and ann["width"] == ann["height"] == size


def test_write_world_is_deterministic(world, tmp_path):
  folder, train, _ = world
  again = shapes.write_world(tmp_path, "train", 20, seed=0)
  assert again == train[:20]
  for ann in again:
    assert (tmp_path / ann["image"]).read_bytes() == (folder / ann["image"]).read_bytes()
  assert json.loads((folder / "train.json").read_text()) == train


def test_object_counts_weigh_how_many_objects_an_image_holds():
  def counts(weights):
    return Counter(len(shapes.render(seed, 48, weights)[1]["objects"]) for seed in range(400))
  assert counts((0, 0, 0, 1)) == {4: 400}
  assert counts((0, 1, 0, 0)) == {2: 400}
  dense = counts((0.1, 0.2, 0.35, 0.35))
  assert set(dense) == {1, 2, 3, 4} and 0.6 <= (dense[3] + dense[4]) / 400 <= 0.8, dense
  uniform = counts(None)
  assert 0.4 <= (uniform[3] + uniform[4]) / 400 <= 0.6, uniform
  for bad in ((0.5, 0.5), (0.5, 0.5, 0.5, 0.5), (-0.1, 0.4, 0.4, 0.3)):
    with pytest.raises(LlavaJaxError, match="object_counts"):
      shapes.render(0, 48, bad)


def test_splits_have_disjoint_seed_ranges(world):
  ranges = list(shapes.SPLIT_RANGES.values())
  for i, a in enumerate(ranges):
    for b in ranges[i + 1:]:
      assert a.stop <= b.start or b.stop <= a.start
  for split, r in shapes.SPLIT_RANGES.items():
    for seed in (0, 1, 999):
      seeds = shapes.image_seeds(split, shapes.SEED_BLOCK, seed)
      assert seeds.start in r and seeds[-1] in r
  assert set(shapes.image_seeds("train", 10, 0)).isdisjoint(shapes.image_seeds("train", 10, 1))
  _, train, test = world
  assert {a["seed"] for a in train}.isdisjoint(a["seed"] for a in test)
  folder = world[0]
  digest = lambda a: hashlib.sha256((folder / a["image"]).read_bytes()).hexdigest()
  assert {digest(a) for a in train}.isdisjoint(digest(a) for a in test)
  for bad in (dict(split="dev", n=1), dict(split="train", n=1, seed=1000),
              dict(split="train", n=shapes.SEED_BLOCK + 1), dict(split="train", n=-1)):
    with pytest.raises(LlavaJaxError):
      shapes.image_seeds(**bad)


def test_annotations_are_well_formed(world):
  _, train, _ = world
  counts = Counter(len(a["objects"]) for a in train)
  assert set(counts) == {1, 2, 3, 4}
  seen = Counter()
  for ann in train:
    boxes = []
    for o in ann["objects"]:
      seen.update([o["shape"], o["color"], o["size"]])
      x, y, w, h = o["bbox"]
      assert 0 <= x and 0 <= y and x + w <= ann["width"] and y + h <= ann["height"]
      assert o["center"] == [x + w / 2, y + h / 2]
      cell = ann["width"] / shapes.LAYOUT_GRID
      # a star spans 0.95 of its side; boxes round out to whole pixels: two pixels of slack
      assert max(w, h) >= 0.75 * cell if o["size"] == "large" else max(w, h) <= 0.72 * cell + 2
      # inside one layout cell (what a 4 x 4 patch grid sees as one token)
      assert x // cell == (x + w - 1e-6) // cell and y // cell == (y + h - 1e-6) // cell
      boxes.append((x, y, w, h))
    for i, (x, y, w, h) in enumerate(boxes):  # no two boxes overlap
      for x2, y2, w2, h2 in boxes[i + 1:]:
        assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y
    for o in ann["objects"]:  # the caption names every object
      assert f"{o['size']} {o['color']} {o['shape']}" in ann["caption"]
  assert set(shapes.SHAPES) | set(shapes.COLORS) | set(shapes.SIZES) <= set(seen)
  assert len(shapes.SHAPES) >= 4 and len(shapes.COLORS) >= 6


def test_annotations_are_true_of_the_pixels(world):
  """Pixels of a palette color lie only inside boxes of objects of that color (so backgrounds
  never use the palette), and every object is visible inside its box."""
  folder, train, _ = world
  palette = {name: np.array(rgb, np.float32) for name, rgb in shapes.COLORS.items()}
  for ann in train[:100]:
    pixels = np.asarray(Image.open(folder / ann["image"]).convert("RGB"), np.float32)
    for name, rgb in palette.items():
      near = np.linalg.norm(pixels - rgb, axis=-1) < 40
      allowed = np.zeros(near.shape, bool)
      for o in ann["objects"]:
        x, y, w, h = o["bbox"]
        if o["color"] == name:
          allowed[y:y + h, x:x + w] = True
          assert near[y:y + h, x:x + w].sum() >= 8, f"{ann['id']}: {name} {o['shape']} not visible"
      assert not (near & ~allowed).any(), f"{ann['id']}: {name} pixels outside its boxes"


# ---------------------------------------------------------------- the engine


def _check_llava_format(samples):
  ids = [s["id"] for s in samples]
  assert len(ids) == len(set(ids))
  for s in samples:
    assert isinstance(s["id"], str) and isinstance(s["image"], str)
    conv = s["conversations"]
    assert conv and len(conv) % 2 == 0
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    assert all(isinstance(t["value"], str) and t["value"].strip() for t in conv)
    assert conv[0]["value"].count("<image>") == 1
    assert all("<image>" not in t["value"] for t in conv[1:])
    assert len(s["meta"]["turns"]) == len(conv) // 2


def test_data_is_valid_llava_json(world):
  folder = world[0]
  paths = ie.write_datasets(folder, "train", seed=0)
  for path in paths.values():
    samples = json.loads(path.read_text())
    assert len(samples) >= N_TRAIN
    _check_llava_format(samples)
    assert all((folder / s["image"]).is_file() for s in samples[:50])
  caption = json.loads(paths["caption"].read_text())
  assert all(s["conversations"][0]["value"].startswith("<image>\n") for s in caption)
  assert {s["meta"]["kind"] for s in json.loads(paths["instruct"].read_text())} == {
      "conversation", "detail", "reasoning"}


def test_every_generated_answer_is_true(annotations, instruct):
  by_id = {a["image"]: a for a in annotations}
  checked = Counter()
  for s in instruct:
    ann = by_id[s["image"]]
    conv = s["conversations"]
    for i, turn in enumerate(s["meta"]["turns"]):
      question, reply = conv[2 * i]["value"], conv[2 * i + 1]["value"]
      if turn["qtype"] == "detail":
        for o in ann["objects"]:
          assert f"{o['size']} {o['color']} {o['shape']}" in reply
        assert shapes.NUMBER_WORDS[len(ann["objects"])] + " object" in reply
        for a_color, a_shape, rel, b_color, b_shape in _RELATION.findall(reply):
          a = _the(ann, {"color": a_color, "shape": a_shape})
          b = _the(ann, {"color": b_color, "shape": b_shape})
          assert _holds(a, b, rel.split()[-2] if rel.startswith("to") else rel), reply
        checked["relation sentence"] += bool(_RELATION.search(reply))
        continue
      assert turn["answer"] == _truth(ann, turn["qtype"], turn["args"]), (s["id"], question)
      for word in _arg_words(turn["args"]):
        assert word in question, (word, question)
      if turn["qtype"] in ie.QA_TYPES:
        # the decision word a scorer reads is the canonical answer ...
        assert scoring.decision(reply, ie.ANSWER_WORDS[turn["qtype"]]) == turn["answer"], reply
        if turn["qtype"] in ("color", "shape", "existence"):  # ... after the object is restated
          assert all(w in reply.lower() for w in _arg_words(turn["args"])), (reply, turn["args"])
        if turn["qtype"] == "shape":  # ... with the color it is looked up by right before it
          assert reply.endswith(f"{turn['args']['ref']['color']} {turn['answer']}."), reply
        if turn["qtype"] == "existence":  # ... and the colors of the named shape are looked up
          assert _looked_up_colors(reply, turn["args"]["shape"]) == {
              o["color"] for o in _with(ann, {"shape": turn["args"]["shape"]})}, reply
      elif turn["answer"] in ("yes", "no"):
        assert reply.startswith(turn["answer"].capitalize())
      else:
        assert turn["answer"] in reply
      checked[turn["qtype"]] += 1
  assert set(checked) == {*ie.QA_TYPES, *ie.REASONING_TYPES, "relation sentence"}, checked


def test_eval_questions_are_true_and_balanced(world):
  _, _, test = world
  by_image = {a["image"]: a for a in test}
  questions = ie.make_eval_questions(test, seed=1)
  assert questions == ie.make_eval_questions(test, seed=1)
  types = Counter(q["qtype"] for q in questions)
  assert set(types) == set(ie.QA_TYPES) and min(types.values()) > N_TEST // 2
  for q in questions:
    assert q["answer"] == _truth(by_image[q["image"]], q["qtype"], q["args"]), q
    assert "<image>" not in q["question"]
  exist = [q["answer"] for q in questions if q["qtype"] == "existence"]
  assert exist.count("yes") == len(exist) // 2 + len(exist) % 2


def test_training_existence_is_balanced(instruct):
  answers = Counter(t["answer"] for s in instruct for t in s["meta"]["turns"]
                    if t["qtype"] == "existence")
  assert 0.4 <= answers["yes"] / sum(answers.values()) <= 0.6, answers


def test_conversations_hold_a_contrasting_existence_pair_at_any_position(instruct):
  convs = [s["meta"]["turns"] for s in instruct if s["meta"]["kind"] == "conversation"]
  first_types = Counter(turns[0]["qtype"] for turns in convs)
  for turns in convs:
    assert 3 <= len(turns) <= 5
    assert sorted(t["answer"] for t in turns if t["qtype"] == "existence") == ["no", "yes"]
  assert set(first_types) == set(ie.QA_TYPES), first_types  # every type also opens conversations


@pytest.mark.parametrize("split", ie.POPE_SPLITS)
def test_pope(world, split):
  _, _, test = world
  questions = ie.make_pope_questions(test, split, seed=0)
  assert [q["answer"] for q in questions].count("yes") * 2 == len(questions)
  present = {a["image"]: {f"{o['color']} {o['shape']}" for o in a["objects"]} for a in test}
  for q in questions:
    assert (q["object"] in present[q["image"]]) == (q["answer"] == "yes"), q
    assert q["object"] in q["question"]
  freq = Counter(obj for objs in present.values() for obj in objs)
  vocab = {f"{c} {s}" for c in shapes.COLORS for s in shapes.SHAPES}
  for image, objs in present.items():
    negatives = {q["object"] for q in questions if q["image"] == image and q["answer"] == "no"}
    others = vocab - objs - negatives
    if split == "popular":  # no unchosen absent object is more frequent than a chosen one
      assert min(freq[n] for n in negatives) >= max(freq[o] for o in others)
    if split == "adversarial":
      co = lambda v: sum(1 for s in present.values() if v in s for p in objs if p in s and p != v)
      assert min(co(n) for n in negatives) >= max(co(o) for o in others)


def test_pope_rejects_unknown_split(world):
  with pytest.raises(LlavaJaxError, match="unknown split"):
    ie.make_pope_questions(world[2], "hard")


def test_engine_reads_only_text(monkeypatch):
  """Annotations pointing at images that do not exist are enough, and no image is opened."""
  anns = []
  for seed in range(40):
    _, ann = shapes.render(seed)
    anns.append({"image": f"nowhere/{seed}.png", **ann})
  monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("the engine opened an image"))
  samples = ie.make_caption_set(anns) + ie.make_instruct_set(anns)
  _check_llava_format(samples)
  for split in ie.POPE_SPLITS:
    ie.make_pope_questions(anns, split)
  assert ie.make_instruct_set(anns, seed=3) == ie.make_instruct_set(anns, seed=3)
  assert ie.make_instruct_set(anns, seed=3) != ie.make_instruct_set(anns, seed=4)


def test_several_samples_per_image_are_distinct():
  anns = [{"image": f"mem/{seed}.png", **shapes.render(seed)[1]} for seed in range(30)]
  one = ie.make_instruct_set(anns, seed=0)
  three = ie.make_instruct_set(anns, seed=0, per_image={"conversation": 3})
  kinds = Counter(s["meta"]["kind"] for s in three)
  assert kinds["conversation"] == 3 * Counter(s["meta"]["kind"] for s in one)["conversation"]
  assert kinds["detail"] == 30 and len({s["id"] for s in three}) == len(three)
  first = {s["id"]: s for s in one}  # copy 0 is the single-sample set's sample
  assert all(first[s["id"]] == s for s in three if s["id"] in first)
  convs = [tuple(t["value"] for t in s["conversations"]) for s in three if s["meta"]["kind"] == "conversation"]
  assert len(set(convs)) > 0.9 * len(convs)


def test_a_custom_writer_plugs_in():
  class Echo:  # what a language-model writer would look like: annotation in, turns out
    kind = "echo"

    def write(self, annotation, rng):
      return [{"from": "human", "value": "What is this?"},
              {"from": "gpt", "value": annotation["caption"]}]

  _, ann = shapes.render(3)
  samples = ie.build_samples([{"image": "x.png", **ann}], Echo())
  _check_llava_format(samples)
  assert samples[0]["conversations"][0]["value"] == "<image>\nWhat is this?"
  assert samples[0]["meta"]["kind"] == "echo"
