"""Demo building blocks: workdir safety, the chat template, stage-0 pieces.

The demo end to end (`--quick` sizes, every phase, the results contract, chat on the export) is
run by tests/test_notebook.py. Issue 4's accuracy thresholds are not met yet: the recipe does
not ground its answers in the image within the demo's budget (see the issue notes).
"""

import os
import subprocess
import sys



def _cli(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "llava_jax", *args], capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_demo_refuses_a_foreign_workdir(tmp_path):
  (tmp_path / "precious.txt").write_text("not the demo's")
  proc = _cli("demo", "--workdir", str(tmp_path), "--quick", timeout=120)
  assert proc.returncode == 2
  assert "not written by `llava-jax demo`" in proc.stderr
  assert (tmp_path / "precious.txt").exists()


# ---- fast unit tests of the demo's pieces --------------------------------------------------


def test_chat_template_renders_the_training_prompt():
  from llava_jax.data import processor, templates
  from llava_jax.demo.tokenizer import VICUNA_CHAT_TEMPLATE
  question = "What color is the star?"
  ours = processor.format_prompt(question, 1, VICUNA_CHAT_TEMPLATE,
                                 template_vars={"bos_token": "<s>", "eos_token": "</s>"})
  assert ours == templates.generation_prompt("vicuna_v1", processor.add_image_tags(question, 1), bos="")


def test_grid_scene_follows_the_patch_layout():
  from llava_jax.demo import world
  ann = {"width": 64, "height": 64, "objects": [
      {"color": "red", "shape": "star", "center": [8, 8], "bbox": [2, 2, 12, 12]},
      {"color": "blue", "shape": "circle", "center": [60, 40], "bbox": [54, 34, 10, 12]}]}
  cells = world.grid_scene(ann, 4).replace("><", ">\n<").split("\n")
  assert len(cells) == 16
  assert cells[0] == "<red_star>" and cells[2 * 4 + 3] == "<blue_circle>"
  assert cells.count(world.EMPTY_TOKEN) == 14


def test_hard_negative_differs_from_the_caption():
  import numpy as np
  from llava_jax.data import shapes
  from llava_jax.demo import world
  rng = np.random.default_rng(0)
  for seed in range(20):
    _, ann = shapes.render(seed)
    assert world.hard_negative(ann, rng) != world.clip_caption(ann)


def test_clip_loss_prefers_matching_pairs():
  import jax.numpy as jnp
  from llava_jax.demo.stage0 import clip_loss
  eye = jnp.eye(4)
  matched, acc = clip_loss(eye, eye, -eye, 10.0)
  shuffled, _ = clip_loss(eye, eye[::-1], -eye, 10.0)
  assert float(acc) == 1.0 and float(matched) < 0.01 < float(shuffled)


def test_pack_cuts_a_stream_of_documents():
  import numpy as np
  from llava_jax.demo.stage0 import pack
  rows = pack([[5, 6, 7], [8], [9, 10]], 3, eos_id=2)
  assert rows.tolist() == [[5, 6, 7], [2, 8, 2], [9, 10, 2]]
