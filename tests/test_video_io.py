"""Video input end to end: video files (PyAV) and frames folders sampled uniformly; `llava-jax generate --video` and
`chat /video` on tiny OneVision and NeXT-Video folders against transformers' greedy output for the same frames; the
server's video_url (data URL, local path under --allow-local-media) and several image_url parts; bad input."""

from __future__ import annotations

import base64
import functools
import io
import json
import logging

import av
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import test_video_models as tvm  # the tiny models, tokenizer, per-frame reference pixels and token counts
from hf_fixtures import save_tiny_hf_folder
from tokenizer_fixture import build_word_tokenizer
from video_fixtures import CODECS, write_video
from llava_jax import cli
from llava_jax.config import load_config
from llava_jax.data import llava_json, pipeline, templates
from llava_jax.data.images import ImageProcessor
from llava_jax.data.layouts import layout_for
from llava_jax.data.processor import Processor, load_tokenizer
from llava_jax.data.video import video_layout_for
from llava_jax.data.video_io import num_frames_for, read_video
from llava_jax.errors import LlavaJaxError
from llava_jax.infer import chat
from llava_jax.infer.serve.app import create_app
from llava_jax.infer.serve.command import load_service
from llava_jax.infer.serve.errors import ApiError
from llava_jax.infer.serve.service import ChatService
from llava_jax.train import build

FRAMES = np.random.default_rng(7).integers(0, 256, (12, 30, 44, 3), dtype=np.uint8)  # even sides for yuv420p
QUESTION, MAX_NEW = "what happens here ?", 12
MODEL_ID = "tiny-ov"
# role, then each part in order: the shape of OneVision's chat template
TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}{% for c in message['content'] %}"
            "{% if c['type'] == 'image' %}{{ '<image> ' }}{% elif c['type'] == 'video' %}{{ '<video> ' }}"
            "{% else %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@functools.lru_cache(maxsize=None)
def tokenizer():
  """test_video_models' words and specials, with filler words up to the models' 128 ids: every generated id is
  text."""
  words = len(set(" ".join([tvm.VIDEO_TEXT, tvm.IMAGE_TEXT, "two"]).replace("<video>", " ").replace("<image>", " ")
                  .split()))
  filler = " ".join(f"w{i:03d}" for i in range(128 - len(tvm.SPECIALS) - words))
  return build_word_tokenizer([tvm.VIDEO_TEXT, tvm.IMAGE_TEXT, "<video> <image> two", filler], tvm.SPECIALS)


def _encode_no_frames(path):
  with av.open(str(path), "w", format="mp4") as out:
    stream = out.add_stream("libx264", rate=4)
    stream.width, stream.height, stream.pix_fmt = 44, 30, "yuv420p"
    out.start_encoding()
    out.mux(stream.encode())
  return path


def _pyav_frames(path):
  with av.open(str(path)) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  root = tmp_path_factory.mktemp("media")
  clips = {ext: write_video(root / f"clip.{ext}", FRAMES, ext) for ext in CODECS}
  (root / "frames").mkdir()
  for i in reversed(range(len(FRAMES))):  # written out of order: read in name order
    Image.fromarray(FRAMES[i]).save(root / "frames" / f"f{i:03d}.png")
  (root / "empty").mkdir()
  _encode_no_frames(root / "no_frames.mp4")
  (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
  for i, seed in enumerate((1, 2)):
    Image.fromarray(tvm._frames(1, (40 + 10 * i, 60), seed)[0]).save(root / f"img{i}.png")
  return dict(clips, root=root)


def _save_folder(path, kind):
  hf_model = tvm.onevision_model() if kind == "onevision" else tvm.next_video_model()
  hf_model.save_pretrained(path)
  tokenizer().save_pretrained(path)
  (tvm._ov_image_processor() if kind == "onevision" else tvm.next_image_processor()).save_pretrained(path)
  (path / "chat_template.jinja").write_text(TEMPLATE)
  if kind == "onevision":  # the folder's frame count; NeXT-Video's folder takes the model type's default
    (path / "video_preprocessor_config.json").write_text(json.dumps({"num_frames": 6}))
  return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  return {kind: _save_folder(tmp_path_factory.mktemp(kind), kind) for kind in ("onevision", "next_video")}


@functools.lru_cache(maxsize=None)
def _transformers_answer(kind, num_frames):
  """transformers' greedy answer to QUESTION about FRAMES sampled to num_frames, its inputs built as the
  processors build them: per-frame image processor pixels, the processor's video token count."""
  hf_model = tvm.onevision_model() if kind == "onevision" else tvm.next_video_model()
  pixels = tvm._reference_frames(kind, FRAMES[np.linspace(0, len(FRAMES) - 1, num_frames).astype(int)])
  count = tvm._reference_video_tokens(kind, hf_model, pixels)
  ids = tokenizer()(f"USER: {'<video>' * count} {QUESTION} ASSISTANT:", return_tensors="pt")["input_ids"]
  with torch.no_grad():
    out = hf_model.generate(input_ids=ids, pixel_values_videos=torch.from_numpy(pixels)[None], do_sample=False,
                            max_new_tokens=MAX_NEW, pad_token_id=tvm.PAD)
  answer = tokenizer().decode(out[0, ids.shape[1]:], skip_special_tokens=True)
  assert answer.strip()
  return answer


def _cli(capsys, *args):
  cli.main(list(map(str, args)))
  return capsys.readouterr().out


def _exits_2(capsys, args, message):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(list(map(str, args)))
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


# ---- decoding and sampling ---------------------------------------------------------------------


@pytest.mark.parametrize("ext", list(CODECS) + ["frames"])
def test_videos_and_frame_folders_are_sampled_uniformly(media, ext):
  want = FRAMES if ext in ("mkv", "frames") else _pyav_frames(media[ext])  # lossy codecs: PyAV's own frames
  source = media["root"] / "frames" if ext == "frames" else media[ext]
  for count in (5, 12, 20):  # fewer, as many and more frames than the video has (then frames repeat)
    indices = np.linspace(0, 11, count).astype(int)
    np.testing.assert_array_equal(read_video(source, count), want[indices])
  if ext != "frames":  # a file's bytes, as the server receives them
    np.testing.assert_array_equal(read_video(media[ext].read_bytes(), 5), want[[0, 2, 5, 8, 11]])


def test_frame_count_comes_from_the_folder_else_the_model_type(tmp_path):
  assert num_frames_for(str(tmp_path), "llava_onevision") == 32
  assert num_frames_for(str(tmp_path), "llava_next_video") == 8
  assert num_frames_for(str(tmp_path), "llava_next_video", 3) == 3
  (tmp_path / "config.json").write_text(json.dumps({"frames_upbound": 16}))
  assert num_frames_for(str(tmp_path), "llava_onevision") == 16
  (tmp_path / "processor_config.json").write_text(json.dumps({"num_frames": 12}))
  assert num_frames_for(str(tmp_path), "llava_onevision") == 12
  (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"num_frames": 10}))
  assert num_frames_for(str(tmp_path), "llava_onevision") == 10 and num_frames_for(str(tmp_path), "x", 4) == 4
  (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"num_frames": "ten"}))
  with pytest.raises(LlavaJaxError, match=r"^number of video frames must be a positive int, got 'ten'$"):
    num_frames_for(str(tmp_path), "llava_onevision")


def test_undecodable_videos_are_named(media):
  with pytest.raises(LlavaJaxError, match=r"broken.mp4: cannot decode the video \("):
    read_video(media["root"] / "broken.mp4", 4)
  with pytest.raises(LlavaJaxError, match=r"^<9 bytes of video>: cannot decode the video \("):
    read_video(b"not video", 4)
  with pytest.raises(LlavaJaxError, match=r"no_frames.mp4: no video stream$"):  # (a container without frames)
    read_video(media["root"] / "no_frames.mp4", 4)
  with pytest.raises(LlavaJaxError, match=r"empty: no frames \(no .jpg"):
    read_video(media["root"] / "empty", 4)
  with pytest.raises(LlavaJaxError, match=r"nowhere.mp4: video file or frames folder not found$"):
    read_video(media["root"] / "nowhere.mp4", 4)
  with pytest.raises(LlavaJaxError, match=r"clip.mkv: frames of 44x30 pixels, over the limit of 1000 pixels$"):
    read_video(media["mkv"], 4, max_pixels=1000)


# ---- generate and chat against transformers --------------------------------------------------


@pytest.mark.parametrize("kind,flags,num_frames", [("onevision", [], 6), ("next_video", ["--num-frames", 5], 5)])
def test_generate_video_equals_transformers(capsys, folders, media, kind, flags, num_frames):
  """OneVision samples its folder's 6 frames; NeXT-Video 5 by --num-frames (its default would be 8)."""
  out = _cli(capsys, "generate", "--model", folders[kind], "--video", media["mkv"], "--prompt", QUESTION,
             "--max-new-tokens", MAX_NEW, *flags)
  assert out == _transformers_answer(kind, num_frames) + "\n"


def test_generate_from_a_frames_folder_and_chat_video_equal_transformers(capsys, folders, media):
  want = _transformers_answer("onevision", 6)
  out = _cli(capsys, "generate", "--model", folders["onevision"], "--video", media["root"] / "frames",
             "--prompt", f"USER: <video> {QUESTION} ASSISTANT:", "--raw", "--max-new-tokens", MAX_NEW)
  assert out == want + "\n"
  answers = io.StringIO()
  chat.chat_command(str(folders["onevision"]), None, MAX_NEW, 0.0, io.StringIO(
      f"/video {media['root'] / 'nowhere.mp4'}\n/video {media['mkv']}\n{QUESTION}\n/quit\n"), answers)
  assert answers.getvalue() == want + "\n"
  assert "nowhere.mp4: video file or frames folder not found" in capsys.readouterr().err
  answers = io.StringIO()  # chat --video: the video goes with the first message
  chat.chat_command(str(folders["onevision"]), None, MAX_NEW, 0.0, io.StringIO(f"{QUESTION}\n"), answers,
                    video=str(media["mkv"]))
  assert answers.getvalue() == want + "\n"


def test_generate_bad_video_input_exits_2(capsys, folders, media, tmp_path):
  plain = save_tiny_hf_folder(tmp_path)  # a llava model
  capsys.readouterr()  # (its saving's progress bars)
  _exits_2(capsys, ["generate", "--model", plain, "--video", media["mkv"], "--prompt", "hi"],
           "a llava model takes no videos (video models: llava_onevision, llava_next_video)")
  base = ["generate", "--model", folders["onevision"], "--prompt", QUESTION, "--max-new-tokens", 2]
  for args, message in [
      (["--video", media["root"] / "broken.mp4"], "broken.mp4: cannot decode the video ("),
      (["--video", media["root"] / "empty"], "empty: no frames"),
      (["--video", media["mkv"], "--num-frames", 0], "--num-frames must be >= 1, got 0"),
      (["--video", media["mkv"], "--num-frames", 60], "video 1: 60 frames take 541 video tokens, more than the "
                                                      "model's 512 positions"),
      (["--video", media["mkv"], "--video", media["mkv"], "--raw"], "--raw prompt has 0 <video> tag(s) but 2"),
      (["--video", media["mkv"], "--video", media["mkv"], "--prompt", "<video> twice ?"],
       "prompt has 1 <video> tag(s) but 2 video(s) were given")]:
    _exits_2(capsys, base + args, message)


# ---- the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(folders, media):
  return load_service(str(folders["onevision"]), model_id=MODEL_ID, max_batch=2, batch_wait_ms=1,
                      media_dir=str(media["root"]))


def _body(*parts, text=QUESTION):
  return {"model": MODEL_ID, "temperature": 0, "max_tokens": MAX_NEW,
          "messages": [{"role": "user", "content": list(parts) + [{"type": "text", "text": text}]}]}


def _video(url):
  return {"type": "video_url", "video_url": {"url": url}}


def _image(path):
  return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(path.read_bytes())
                                                    .decode()}}


def _data_url(path, media_type="video/x-matroska"):
  return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode()


def test_server_video_url_and_two_image_urls(capsys, service, folders, media):
  want_video = _transformers_answer("onevision", 6)
  want_images = _cli(capsys, "generate", "--model", folders["onevision"], "--image", media["root"] / "img0.png",
                     "--image", media["root"] / "img1.png", "--prompt", QUESTION, "--max-new-tokens", MAX_NEW)
  with TestClient(create_app(service)) as client:
    answer = lambda body: client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert answer(_body(_video(_data_url(media["mkv"])))) == want_video
    assert answer(_body(_video("clip.mkv"))) == want_video  # a local file under --allow-local-media
    assert answer(_body(_video(f"file://{media['mkv']}"))) == want_video
    assert answer(_body(_image(media["root"] / "img0.png"), _image(media["root"] / "img1.png"))) + "\n" == want_images


def test_server_bad_video_requests_get_4xx(service, media):
  data_only = ChatService(service.session, MODEL_ID)  # started without --allow-local-media
  broken = _data_url(media["root"] / "broken.mp4", "video/mp4")
  for server, body, status, code in [
      (service, _body(_video(broken)), 400, "invalid_video"),
      (service, _body(_video("empty")), 400, "invalid_video"),
      (service, _body(_video("../outside.mkv")), 403, "forbidden_path"),
      (service, _body(_video("/etc/passwd")), 403, "forbidden_path"),
      (service, _body(_video("https://example.com/a.mp4")), 400, "unsupported_video_url"),
      (data_only, _body(_video("clip.mkv")), 400, "unsupported_video_url"),
      (service, _body(_video(_data_url(media["mkv"], "image/png"))), 400, "invalid_video_url"),
      (service, _body(*[_video(_data_url(media["mkv"]))] * 3), 400, "too_many_videos"),
      (service, _body(_video(_data_url(media["mkv"])), text="<video> <video> twice"), 400, "invalid_messages")]:
    with pytest.raises(ApiError) as error:
      server.prepare(json.dumps(body).encode())
    assert (error.value.status, error.value.code) == (status, code), (body["messages"], error.value.message)


# ---- training samples ----------------------------------------------------------------------------


def _conv(*values):
  return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


@pytest.mark.parametrize("kind", ["onevision", "next_video"])
def test_training_video_samples_are_processed_as_inference_and_bad_ones_skipped(folders, media, tmp_path, caplog,
                                                                                kind):
  """LLaVA-Video records (`<image>` stands for the video) through the pipeline of a video model equal
  Processor.encode of the same rendered text with a `<video>` and the same sampled frames: tokens, frames, and the
  feature index (OneVision's: the taps and their weights)."""
  folder = folders[kind]
  config = load_config(str(folder))
  tokenizer = load_tokenizer(str(folder))
  records = [
      {"id": "broken", "video": "broken.mp4", "conversations": _conv(f"<image>\n{QUESTION}", "two")},
      {"id": "clip", "video": "clip.mkv", "conversations": _conv(f"<image>\n{QUESTION}", "two")},
      {"id": "missing", "video": "nowhere.mp4", "conversations": _conv(QUESTION, "two")},
      {"id": "empty", "video": "empty", "conversations": _conv(QUESTION, "two")},
      {"id": "two_tags", "video": "clip.mkv", "conversations": _conv("<image> <video>", "two")},
      {"id": "frames", "video": "frames", "conversations": _conv(QUESTION, "this")}]  # no tag: placed first
  (tmp_path / "data.json").write_text(json.dumps(records))
  data = pipeline.DataConfig.from_config(dict(json=str(tmp_path / "data.json"), video_folder=str(media["root"]),
                                              template="vicuna_v1", max_len=512, num_frames=5, shuffle=False,
                                              read_threads=1))
  image_processor = ImageProcessor.from_folder(str(folder))
  pipe = pipeline.make_pipeline(data, tokenizer, image_processor, layout=layout_for(config), global_batch_size=1,
                                seed=0, image_token_id=config.image_token_index,
                                videos=build.video_samples(config, tokenizer, str(folder), data.num_frames))
  with caplog.at_level(logging.WARNING, logger="llava_jax.data"):
    iterator = pipe.iterator()
    batches = [next(iterator), next(iterator)]
  assert [int(b["skipped"]) for b in batches] == [1, 4]
  for reason in ("broken: corrupt_video", "missing: missing_video", "empty: corrupt_video",
                 "two_tags: image_count_mismatch"):
    assert f"skipping sample {reason}" in caplog.text
  ours = Processor.from_folder(str(folder), layout_for(config), video_layout=video_layout_for(config))
  frames = FRAMES[np.linspace(0, len(FRAMES) - 1, 5).astype(int)]
  for batch, answer in zip(batches, ("two", "this")):
    rendered = templates.render("vicuna_v1", [("human", f"<video>\n{QUESTION}"), ("gpt", answer)],
                                tokenizer.bos_token, "</s>")  # Preprocess's EOS where the tokenizer has none
    want = ours.encode(rendered.text, [], videos=[frames], add_special_tokens=not rendered.has_bos)
    length = int(batch["attention_mask"][0].sum())
    np.testing.assert_array_equal(batch["input_ids"][0, :length], want.input_ids)
    np.testing.assert_array_equal(batch["pixel_values"][0, :5], want.pixel_values)
    assert not batch["pixel_values"][0, 5:].any()
    video_tokens = batch["input_ids"][0] == tvm.VIDEO_TOKEN
    count = ours.video_layout.num_video_tokens(5)
    assert video_tokens.sum() == count and not batch["loss_mask"][0][video_tokens].any()
    index, want_index = batch[pipeline.FEATURE_INDEX][0, :count], want.image_feature_index
    if kind == "onevision":  # a FeatureMix: each token's taps and their weights
      np.testing.assert_array_equal(index, want_index.index)
      np.testing.assert_array_equal(batch[pipeline.FEATURE_WEIGHTS][0, :count], want_index.weights)
    else:
      np.testing.assert_array_equal(index, want_index)


def test_video_samples_of_a_model_without_videos_are_counted_skips(media):
  record = {"id": "v", "video": "clip.mkv", "conversations": _conv(QUESTION, "two")}
  sample = llava_json.parse_sample(record, 0, video_folder=str(media["root"]))
  assert sample.video == str(media["mkv"]) and sample.images == () and sample.turns[0][1] == f"<image>\n{QUESTION}"
  tagged = llava_json.parse_sample(dict(record, conversations=_conv(f"Q: <video> {QUESTION}", "two")), 0)
  assert tagged.turns[0][1] == f"Q: <image> {QUESTION}"  # a <video> tag marks the video's place too
  image_wins = llava_json.parse_sample(dict(record, image="img0.png"), 0, str(media["root"]))  # as LLaVA-NeXT
  assert image_wins.video is None and len(image_wins.images) == 1
  bad = llava_json.parse_sample(dict(record, video=["a.mp4"]), 0)
  assert bad.reason == "malformed_conversation" and "'video' must be a path" in bad.detail
