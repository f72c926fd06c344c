"""The demo's phases, each a function of the workdir and the settings (see recipe.py)."""

from __future__ import annotations

import concurrent.futures
import json
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from llava_jax.data import images as images_lib
from llava_jax.data import instruct_engine
from llava_jax.demo import world

IMAGE_TAG = "<image>"


def _bar(desc: str, total: int, position: int | None = None):
  return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True, position=position)


def _progress(bar):
  """A training loop's (step, loss) callback that advances `bar`."""
  return lambda step, loss: (bar.update(), bar.set_postfix(loss=f"{loss:.3f}", refresh=False))


# ---- data -------------------------------------------------------------------------------------


def make_data(workdir: str, s) -> dict:
  folder = os.path.join(workdir, "data")
  with _bar("data: images + instructions", 3) as bar:
    train = world.shapes.write_world(folder, "train", s.n_train, s.seed, s.image_size, s.train_object_counts)
    bar.update()
    test = world.shapes.write_world(folder, "test", s.n_test, s.seed, s.image_size)
    bar.update()
    paths = write_instructions(folder, s)
    bar.update()
  return {"folder": folder, "train": train, "test": test, "caption_json": str(paths["caption"]),
          "instruct_json": str(paths["instruct"])}


def write_instructions(folder: str, s) -> dict:
  """The instruction engine over FOLDER/train.json (text only): stage-1 and stage-2 LLaVA JSON."""
  return instruct_engine.write_datasets(folder, "train", s.seed, {"conversation": s.conversations_per_image})


def fit_to_budget(path: str, out: str, tokenizer, template: str, max_len: int, image_tokens: int) -> dict:
  """Writes the samples of `path` that fit `max_len` tokens (image tokens included) to `out`.

  The trainer would skip the others anyway (and log each); leaving them out of the demo's data
  keeps its log readable. Returns kept/dropped counts.
  """
  samples = world.load_json(path)
  texts = world.rendered_texts(samples, template)
  lengths = [len(ids) + t.count(IMAGE_TAG) * (image_tokens - 1)
             for ids, t in zip(tokenizer(texts)["input_ids"], texts)]
  kept = [sample for sample, n in zip(samples, lengths) if n <= max_len]
  instruct_engine.write_llava_json(kept, out)
  return {"kept": len(kept), "dropped": len(samples) - len(kept)}


# ---- stage 0 ----------------------------------------------------------------------------------


def _corpus(data: dict) -> list[str]:
  """The text the tokenizer and the language model learn from: every training conversation as
  the finetuning template renders it, and every caption (image tags dropped)."""
  texts = []
  for path, template in ((data["instruct_json"], "vicuna_v1"), (data["caption_json"], "plain")):
    samples = world.load_json(path)
    texts += [text.replace(IMAGE_TAG, "") for text in world.rendered_texts(samples, template)]
  return texts


CLIP_CAPTION_TOKENS = 40  # the text tower's context (captions longer than this are cut)


def _encode_captions(tokenizer, rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Token rows -> (N, length) ids ended by EOS, padded after it, and each row's EOS index."""
  ids = np.full((len(rows), length), tokenizer.pad_token_id, np.int32)
  eot = np.zeros(len(rows), np.int32)
  for i, row in enumerate(rows):
    row = row[:length - 1] + [tokenizer.eos_token_id]
    ids[i, :len(row)] = row
    eot[i] = len(row) - 1
  return ids, eot


def llava_config(s, vocab_size: int, image_token_index: int):
  from llava_jax.config import LlavaConfig, TextConfig, VisionConfig  # pylint: disable=import-outside-toplevel
  vision = VisionConfig(hidden_size=s.vision_hidden, intermediate_size=4 * s.vision_hidden,
                        num_hidden_layers=s.vision_layers, num_attention_heads=4, image_size=s.image_size,
                        patch_size=s.patch_size, projection_dim=s.vision_hidden)
  heads = max(1, s.text_hidden // 32)
  text = TextConfig(vocab_size=vocab_size, hidden_size=s.text_hidden, intermediate_size=s.text_hidden * 8 // 3,
                    num_hidden_layers=s.text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                    head_dim=s.text_hidden // heads, max_position_embeddings=512)
  return LlavaConfig(vision=vision, text=text, image_token_index=image_token_index,
                     image_seq_length=vision.num_patches, vision_feature_layer=s.vision_feature_layer,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)


def stage0(workdir: str, data: dict, s) -> dict:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from llava_jax.demo import stage0 as pretrain  # pylint: disable=import-outside-toplevel
  from llava_jax.demo.tokenizer import train_tokenizer  # pylint: disable=import-outside-toplevel
  from llava_jax.models.llava import projector_for  # pylint: disable=import-outside-toplevel
  from llava_jax.weights.model_folder import save_checkpoint_folder  # pylint: disable=import-outside-toplevel

  root = os.path.join(workdir, "stage0")
  assets = os.path.join(root, "assets")
  grid = s.image_size // s.patch_size
  corpus = _corpus(data)
  tokenizer = train_tokenizer(corpus, assets, s.vocab_size)
  image_processor = images_lib.ImageProcessor.default(s.image_size)
  image_processor.save(assets)
  config = llava_config(s, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TAG))

  # CLIP on (image, caption) pairs of the training world.
  rng = np.random.default_rng(s.seed)
  anns = data["train"]
  pixels = np.stack([image_processor([Image.open(world.image_path(data["folder"], a))])[0] for a in anns])
  captions = tokenizer([world.clip_caption(a) for a in anns])["input_ids"]
  hard = tokenizer([world.hard_negative(a, rng) for a in anns])["input_ids"]
  # The text tower's context: the longest caption and its end-of-text token (at most CLIP_CAPTION_TOKENS).
  length = min(CLIP_CAPTION_TOKENS, 1 + max(len(t) for t in captions + hard))
  ids, eot = _encode_captions(tokenizer, captions, length)
  hard_ids, hard_eot = _encode_captions(tokenizer, hard, length)
  regions = None
  if s.clip_dense:
    phrase_ids, phrase_eot = _encode_captions(tokenizer, tokenizer(list(world.PHRASES))["input_ids"], length)
    regions = pretrain.RegionTargets(*world.region_targets(anns, grid), phrase_ids, phrase_eot)
  # The language model trains beside CLIP, in a thread: XLA compiles each step on one core, and
  # each tower's compile and host-side work leave a core the other can use.
  rows = pretrain.pack(tokenizer(corpus)["input_ids"], s.lm_seq, tokenizer.eos_token_id)
  with _bar("stage0: CLIP vision tower", s.clip_steps, position=0) as clip_bar, \
       _bar("stage0: LLaMA language model", s.lm_steps, position=1) as lm_bar, \
       concurrent.futures.ThreadPoolExecutor(1) as pool:
    lm = pool.submit(pretrain.train_lm, config.text, rows, steps=s.lm_steps, batch_size=s.lm_batch, lr=s.lm_lr,
                     seed=s.seed, progress=_progress(lm_bar))
    vision_params, clip_losses = pretrain.train_clip(
        config.vision, pixels, ids, eot, hard_ids, hard_eot, vocab_size=len(tokenizer), steps=s.clip_steps,
        batch_size=s.clip_batch, lr=s.clip_lr, seed=s.seed, pool=s.clip_pool, regions=regions,
        progress=_progress(clip_bar))
    lm_params, lm_losses = lm.result()

  # Only the projector starts random: initializing it alone skips compiling a whole-model init
  # (jitted: one small program compiles faster than its ops do one by one).
  features = np.zeros((1, config.vision_feature_size), np.float32)
  projector = nn.unbox(jax.jit(projector_for(config).init)(pretrain.init_key(s.seed), features))["params"]
  params = {"vision_tower": vision_params, "projector": jax.device_get(projector), "language_model": lm_params}
  path = save_checkpoint_folder(os.path.join(root, "model"), config, params, assets)

  data["caption_json_fit"] = os.path.join(data["folder"], "stage1.json")
  data["instruct_json_fit"] = os.path.join(data["folder"], "stage2.json")
  fit = {"stage1": fit_to_budget(data["caption_json"], data["caption_json_fit"], tokenizer, "plain",
                                 stage1_max_len(s), config.tokens_per_tile),
         "stage2": fit_to_budget(data["instruct_json"], data["instruct_json_fit"], tokenizer, "vicuna_v1",
                                 s.max_len, config.tokens_per_tile)}
  return {"model": path, "clip_losses": clip_losses, "lm_losses": lm_losses, "fit": fit}


def stage1_max_len(s) -> int:
  """Stage 1 sees an image and its short caption only."""
  return (s.image_size // s.patch_size) ** 2 + 48


# ---- stages 1 and 2: the real trainer --------------------------------------------------------


def train_stage(workdir: str, name: str, stage: str, init: str, data_json: str, data: dict, s, quick: bool) -> str:
  from llava_jax.demo.recipe import CONFIG  # pylint: disable=import-outside-toplevel
  from llava_jax.train import main as train_main  # pylint: disable=import-outside-toplevel
  out = os.path.join(workdir, name)
  max_len = stage1_max_len(s) if stage == "pretrain" else s.max_len
  fitted = data.get("caption_json_fit" if stage == "pretrain" else "instruct_json_fit", data_json)
  print(f"{name}: llava-jax train --config configs/demo_shapes.py:stage={stage},quick={int(quick)} ...", flush=True)
  train_main.run(["--config", f"{CONFIG}:stage={stage},quick={int(quick)},max_len={max_len}", "--workdir", out,
                  f"--config.init={init}", f"--config.data.json={fitted}",
                  f"--config.data.image_folder={data['folder']}", f"--config.seed={s.seed}",
                  *(s.stage1_args if stage == "pretrain" else s.stage2_args)])
  return out


def read_losses(train_workdir: str) -> list[list[float]]:
  """[[step, loss], ...] from the trainer's metrics.jsonl."""
  out = []
  with open(os.path.join(train_workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      out.append([record["step"], record["loss"]])
  return out


# ---- export and evaluation --------------------------------------------------------------------


def export(workdir: str, train_workdir: str) -> str:
  from llava_jax.weights import convert  # pylint: disable=import-outside-toplevel
  return convert.jax_to_hf(train_workdir, os.path.join(workdir, "export"))


def evaluate(export_dir: str, data: dict, s) -> dict:
  """The demo's evaluation of the export, and its POPE and short-answer questions scored by `llava-jax eval`
  (results["eval"]; folders and answers under the export's sibling eval/)."""
  from llava_jax.demo import eval_folders  # pylint: disable=import-outside-toplevel
  from llava_jax.demo import evaluate as evaluation  # pylint: disable=import-outside-toplevel
  from llava_jax.infer.run import load_session  # pylint: disable=import-outside-toplevel
  session = load_session(export_dir)
  sets = evaluation.questions(data["test"], s.seed)
  with tqdm(total=len(evaluation.distinct_prompts(sets)), desc="eval: held-out questions (with image and blind)",
            unit="q", dynamic_ncols=True) as bar:
    answers = evaluation.ask(session, data["folder"], sets, progress=bar.update, seed=s.seed)
  results = evaluation.summarize(sets, answers, data["folder"])
  results["eval"] = eval_folders.score(export_dir, sets, answers[False], data["folder"],
                                       os.path.join(os.path.dirname(os.path.abspath(export_dir)), "eval"),
                                       evaluation.Asker.MAX_NEW_TOKENS)
  results["description"] = evaluation.describe(session, data["folder"], data["test"][0], s.seed)
  return results


def param_counts(export_dir: str) -> dict:
  from llava_jax.weights.model_folder import load_model  # pylint: disable=import-outside-toplevel
  params = load_model(export_dir).params
  count = lambda tree: int(sum(np.size(x) for x in _leaves(tree)))
  return {name: count(params[name]) for name in ("vision_tower", "projector", "language_model")}


def _leaves(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _leaves(value)
  else:
    yield tree
