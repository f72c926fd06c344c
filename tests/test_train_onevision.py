"""Training LLaVA-OneVision (configs/llava_onevision.py): the pipeline's rows of a lone image (tiled, its features
downscaled past anyres_max_2), of three images, of text only and of a video (a lossless .mkv sampled to 3 frames)
against transformers' OneVision image processor, token counting and model (logits), packed rows against the same
samples unpacked, bad samples counted; every stage of the recipe on the tiny model with its frozen parameters
bit-identical, and the onevision stage's SIGKILL + rerun equal to an uninterrupted run (one stage: each such run takes
three processes)."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import train_fixtures as F
from hf_fixtures import hf_state
from llava_jax.config import LlavaConfig
from llava_jax.data import pipeline as pl
from llava_jax.data.images import ImageProcessor
from llava_jax.data.layouts import images_feature_index, layout_for, prompt_layout
from llava_jax.data.processor import load_tokenizer
from llava_jax.data.video import video_layout_for
from llava_jax.image_tokens import as_mix
from llava_jax.models.llava import Llava
from llava_jax.train import build, trainer
from llava_jax.train import main as train_main
from llava_jax.weights.mapping import hf_to_params
from test_onevision import (LARGE, SMALL, THREE, _image, reference_image_processor, reference_token_count,
                            tiny_hf_onevision_model)
from test_lora import _checkpoint
from test_train_processes import assert_sigkill_then_rerun_equals_uninterrupted
from test_video_models import _reference_video_tokens  # transformers' video token counting
from video_fixtures import write_video

OV_CONFIG = os.path.join(F.REPO, "configs", "llava_onevision.py")
MAX_LEN = 512  # the five samples packed in two rows (chatml: 117 to 171 tokens each, 12 tiles a row)
FILES = {"small.png": SMALL, "large.png": LARGE, "a.png": THREE[0], "b.png": THREE[1], "c.png": THREE[2]}
# clip.mkv: 5 frames (ffv1, lossless), sampled to NUM_FRAMES (0, 2, 4); a frame is one tile pooled to 2x2 tokens
CLIP = np.random.default_rng(5).integers(0, 256, (5, 24, 32, 3), dtype=np.uint8)
NUM_FRAMES = 3
SAMPLED = CLIP[[0, 2, 4]]


def _record(sid, images, question, answer, video=None):
  record = {"id": sid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
  if images:
    record["image"] = images if len(images) > 1 else images[0]
  if video:
    record["video"] = video
  return record


GOOD = [_record("small", ["small.png"], "<image>\nWhat is in the image?", "A red circle."),
        _record("large", ["large.png"], "<image>\nDescribe it briefly.", "A blue square."),
        _record("three", ["a.png", "b.png", "c.png"], "<image>\n<image>\n<image>\nWhat is in the image?",
                "A green star."),
        _record("clip", [], "<video>\nDescribe it briefly.", "A green circle.", video="clip.mkv"),
        _record("text", [], "What is in the image?", "A yellow triangle.")]
BAD = [_record("extra_image", ["small.png", "a.png"], "<image>\nWhat is in the image?", "A red star."),  # 2 > 1 tag
       _record("four", ["a.png", "b.png", "c.png", "small.png"], "<image>\n" * 4 + "What is in the image?",
               "A red star."),  # 4 images > data.max_images 3
       _record("lost", [], "<video>\nWhat is in the image?", "A red star.", video="lost.mkv")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Tokenizer (<image> = 127) + the tiny OneVision image processor, the images, the good records, and a file with
  the bad ones among them."""
  root = tmp_path_factory.mktemp("ov_world")
  base = F.make_world(root, records=GOOD)
  reference_image_processor().save_pretrained(base["tokenizer"])
  for k, (name, size) in enumerate(FILES.items()):
    _image(size, k).save(root / name)
  write_video(root / "clip.mkv", CLIP, "mkv")
  (root / "mixed.json").write_text(json.dumps(GOOD[:2] + BAD + GOOD[2:]))
  return dict(base, mixed=str(root / "mixed.json"))


@pytest.fixture(scope="module")
def config():
  """The recipe's tiny-ov, which is the OneVision test model's architecture (so its layout is theirs)."""
  ours = build.named_model("tiny-ov")
  reference = LlavaConfig.from_hf_dict(tiny_hf_onevision_model().config.to_dict())
  assert layout_for(ours) == layout_for(reference)
  assert (ours.vision, ours.text.model_type, ours.image_token_index) == (
      reference.vision, reference.text.model_type, reference.image_token_index)
  return reference


def _pipeline(world, config, json_path, packing=False, batch=len(GOOD), videos=True):
  """The pipeline train builds (build.build_pipeline) for `config`, or (videos=False) for a model without videos."""
  data = pl.DataConfig.from_config(dict(json=json_path, image_folder=world["images"], template="chatml",
                                        max_len=MAX_LEN, buckets=(MAX_LEN,), max_images=3, max_tiles=12,
                                        shuffle=False, packing=packing, video_folder=world["images"],
                                        num_frames=NUM_FRAMES))
  tokenizer = load_tokenizer(world["tokenizer"])
  return pl.make_pipeline(data, tokenizer, ImageProcessor.from_folder(world["tokenizer"]), layout=layout_for(config),
                          global_batch_size=batch, seed=0, process_index=0, process_count=1,
                          videos=build.video_samples(config, tokenizer, world["tokenizer"], NUM_FRAMES) if videos
                          else None)


def _reference_frames(frames):
  """transformers' pixels of a video's frames: OneVision's image processor on each frame alone, (F, 3, S, S)."""
  return np.stack([reference_image_processor()([[Image.fromarray(f)]], return_tensors="np")["pixel_values"][0, 0]
                   for f in frames])


def _pictures(world, record):
  names = record.get("image", [])
  return [Image.open(os.path.join(world["images"], n)).convert("RGB") for n in ([names] if isinstance(names, str)
                                                                                  else names)]


@pytest.fixture(scope="module")
def batch(world, config):
  it = _pipeline(world, config, world["mixed"]).iterator()
  out = next(it)
  assert dict(it.skip_counts) == {"image_count_mismatch": 1, "too_many_images": 1, "missing_video": 1}
  assert int(out["skipped"]) == 3
  return out


def test_a_model_without_videos_skips_video_samples(world, config):
  """The same records for a model that takes no videos: the video sample is a counted skip, the rest train."""
  it = _pipeline(world, config, world["mixed"], batch=len(GOOD) - 1, videos=False).iterator()
  out = next(it)
  assert dict(it.skip_counts) == {"image_count_mismatch": 1, "too_many_images": 1, "video_not_supported": 2}
  assert int(out["skipped"]) == 4
  assert not (out["input_ids"] == config.video_token_index).any()


def test_rows_equal_the_onevision_image_processor_and_token_counting(world, config, batch):
  """Row by row: image tokens as LlavaOnevisionProcessor counts them (a lone image by its size, downscaled or not;
  each of several images its tile's features + 1 newline; a video's frames pooled 2x2 + 1 newline, as video
  tokens), tower inputs as LlavaOnevisionImageProcessor gives them (a video: each sampled frame alone), and the
  feature index and weights the model side builds for the same images or frames."""
  per_tile = config.tokens_per_tile
  frames = _reference_frames(SAMPLED)
  expected_tokens = [reference_token_count(SMALL), reference_token_count(LARGE), 3 * (per_tile + 1),
                     _reference_video_tokens("onevision", tiny_hf_onevision_model(), frames), 0]
  assert expected_tokens[1] < layout_for(config).anyres.num_image_tokens(LARGE)  # the large image was downscaled
  assert expected_tokens[3] == NUM_FRAMES * 2 * 2 + 1
  for row, (record, want) in enumerate(zip(GOOD, expected_tokens)):
    ids = batch["input_ids"][row]
    video = "video" in record
    token = config.video_token_index if video else config.image_token_index
    assert int((ids == token).sum()) == want, record["id"]
    assert not (ids == (config.image_token_index if video else config.video_token_index)).any(), record["id"]
    pictures = _pictures(world, record)
    tiles = 0
    if video:
      pixels, tiles = frames, NUM_FRAMES
      mix = video_layout_for(config).feature_index(NUM_FRAMES)
    elif len(pictures) == 1:
      pixels = reference_image_processor()([pictures], return_tensors="np")["pixel_values"][0]
      tiles = layout_for(config).tiles((pictures[0].height, pictures[0].width))
      pixels = pixels[:tiles]
    elif pictures:
      pixels = reference_image_processor()([pictures], return_tensors="np")["pixel_values"][:, 0]
      tiles = len(pictures)
    if tiles:
      np.testing.assert_array_equal(batch["pixel_values"][row, :tiles], pixels.transpose(0, 2, 3, 1))
    assert not batch["pixel_values"][row, tiles:].any()
    if not video:
      layout = prompt_layout(layout_for(config), len(pictures))
      mix = as_mix(images_feature_index(layout, [(p.height, p.width) for p in pictures]))
    np.testing.assert_array_equal(batch[pl.FEATURE_INDEX][row, :want], mix.index)
    np.testing.assert_array_equal(batch[pl.FEATURE_WEIGHTS][row, :want], mix.weights)
    assert not batch[pl.FEATURE_WEIGHTS][row, want:].any()


@pytest.fixture(scope="module")
def our_logits(config):
  """batch -> our logits (B, S, vocab), with the OneVision test model's weights and the train step's feature index."""
  params = hf_to_params(hf_state(tiny_hf_onevision_model()).__getitem__, config)
  apply = jax.jit(lambda b: Llava(config).apply({"params": params}, b["input_ids"], b["pixel_values"],
                                                b["attention_mask"], image_feature_index=trainer.feature_index(b))[0])
  return lambda batch: np.asarray(apply({k: v for k, v in batch.items() if k != "skipped"}))


def test_batch_logits_equal_transformers_row_by_row(world, batch, our_logits):
  """The pipeline's batch through our model (the train step's feature index) against each row alone through
  LlavaOnevisionForConditionalGeneration with transformers' own pixel values (the video row: its frames')."""
  hf_model = tiny_hf_onevision_model()
  ours = our_logits(batch)
  for row, record in enumerate(GOOD):
    count = int(batch["attention_mask"][row].sum())
    inputs = {"input_ids": torch.from_numpy(batch["input_ids"][row:row + 1, :count].astype(np.int64))}
    pictures = _pictures(world, record)
    if pictures:
      processed = reference_image_processor()([pictures], return_tensors="pt")
      inputs.update(pixel_values=processed["pixel_values"], image_sizes=processed["image_sizes"],
                    batch_num_images=processed["batch_num_images"])
    if "video" in record:  # the frames as written, sampled as transformers' examples sample them
      inputs.update(pixel_values_videos=torch.from_numpy(_reference_frames(SAMPLED))[None])
    with torch.no_grad():
      want = hf_model(**inputs).logits[0].numpy()
    got = ours[row, :count]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), record["id"]


def test_packed_rows_give_the_loss_of_the_samples_unpacked(world, config, batch, our_logits):
  """All five samples (the video among them) in two packed rows (feature indexes and weights shifted past the tiles
  before them): the same summed loss and target count as the unpacked batch."""
  packed = next(_pipeline(world, config, world["json"], packing=True, batch=2).iterator())
  assert packed["attention_mask"].max(axis=1).sum() == len(GOOD)
  assert packed[pl.FEATURE_WEIGHTS].shape == packed[pl.FEATURE_INDEX].shape == (2, MAX_LEN, 4)
  sums = [trainer.masked_ce_sum(our_logits(b), b["input_ids"], b["loss_mask"]) for b in (packed, batch)]
  (packed_total, packed_count), (total, count) = sums
  assert float(packed_count) == float(count)
  np.testing.assert_allclose(float(packed_total), float(total), rtol=1e-5)


STAGES = ["pretrain", "knowledge", "single_image", "onevision", "finetune_lora", "finetune_qlora"]
# What each stage trains; everything else must stay bit-identical.
TRAINS = {"pretrain": lambda p: p.startswith("projector/") or p == "image_newline",
          "finetune_lora": lambda p: "/lora_" in p or p.startswith("projector/") or p == "image_newline"}
TRAINS["finetune_qlora"] = TRAINS["finetune_lora"]
# The tower's post_layernorm gets no gradient: OneVision takes the last layer's hidden states before it.
UNUSED = {"vision_tower/post_layernorm/bias", "vision_tower/post_layernorm/scale"}


def _stage_args(world, workdir, stage, **overrides):
  values = {"data.max_len": 192, "data.buckets": "(192,)", "data.max_images": 3, "data.max_tiles": 12,
            "data.template": "plain" if stage == "pretrain" else "chatml", "data.json": world["mixed"],
            "data.video_folder": world["images"], "data.num_frames": NUM_FRAMES,
            "batch_size": 8, "mesh.data": -1, "lr": 1e-3, **overrides}
  return F.train_args(world, workdir, stage=stage, config=OV_CONFIG, **values)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_what_it_should(world, tmp_path, stage):
  """2 steps on batches of a lone image, three images, a video and text (and counted skips), checkpointed after
  each: what the stage freezes is bit-identical between them, what it trains moved."""
  train_main.run(_stage_args(world, tmp_path, stage, total_steps=2, checkpoint_every=1))
  before, after = _checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)
  trains = TRAINS.get(stage, lambda p: p not in UNUSED)
  for path in before:
    assert np.array_equal(before[path], after[path]) != trains(path), path


def test_onevision_stage_batches_hold_the_video(world, tmp_path):
  """The batches train builds from the stage's flags (data in order): the video sample among the images and text,
  the bad samples counted; so the runs above and below train on video rows too."""
  cfg, _ = train_main.parse_flags(_stage_args(world, tmp_path, "onevision", **{"data.shuffle": False}))
  source = build.load_source(cfg)
  it = build.build_pipeline(cfg, source.config, source.assets_dir).iterator()
  out = next(it)  # 8 rows: the 5 good samples, then 3 of them again (the bad ones met twice)
  assert dict(it.skip_counts) == {"image_count_mismatch": 2, "too_many_images": 2, "missing_video": 2}
  assert int((out["input_ids"] == source.config.video_token_index).sum()) == NUM_FRAMES * 2 * 2 + 1


@pytest.mark.parametrize("stage", STAGES)
def test_stage_sigkill_then_rerun_equals_uninterrupted(world, tmp_path, stage):
  """Every stage on the mix of single-image, multi-image, video and text samples (its own trainable set, learning
  rates, template; QLoRA's quantized base)."""
  command = lambda workdir: [sys.executable, "-m", "llava_jax", "train",
                             *_stage_args(world, workdir, stage, total_steps=4, checkpoint_every=2)]
  assert_sigkill_then_rerun_equals_uninterrupted(command, tmp_path)


@pytest.mark.parametrize("size", ["0.5b", "7b", "72b"])
def test_recipe_carries_onevisions_hyperparameters(size):
  """Stage 1: projector and image_newline at 1e-3; the later stages: the whole model at 1e-5, the vision tower at
  2e-6; each size's architecture is its configs/models.py OneVision model, every stage in chatml but stage 1."""
  spec = importlib.util.spec_from_file_location("llava_onevision_recipe", OV_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  recipe = lambda stage: module.get_config(f"stage={stage},size={size}")
  pretrain = recipe("pretrain")
  assert (pretrain.lr, pretrain.data.template, list(pretrain.trainable)) == (
      1e-3, "plain", build.STAGE_TRAINABLE["pretrain"])
  for stage in ("knowledge", "single_image", "onevision"):
    c = recipe(stage)
    multipliers = dict(c.lr_multipliers)
    assert (c.lr, c.data.template, list(c.trainable)) == (1e-5, "chatml", [(".*", True)]), stage
    assert multipliers["vision_tower/.*"] * c.lr == pytest.approx(2e-6) and multipliers[".*"] == 1.0, stage
    assert c.data.max_images == (12 if stage == "onevision" else 1), stage
    assert c.data.num_frames == (32 if stage == "onevision" else 0), stage  # 0: the model folder's (also 32)
  model = build.named_model(pretrain.model)
  assert (model.model_type, model.vision.model_type, model.text.model_type) == (
      "llava_onevision", "siglip_vision_model", "qwen2")
  assert model.text.num_hidden_layers == {"0.5b": 24, "7b": 28, "72b": 80}[size]
