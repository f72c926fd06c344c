"""`llava-jax generate`: a model folder + images + a prompt -> the generated text, streamed.

Also the pieces `chat` (and a server) share: loading a model folder into an engine plus its
processor, and turning engine token chunks into text deltas with stop strings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import IO, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from llava_jax.data import images as images_lib
from llava_jax.data.layouts import layout_for
from llava_jax.data.processor import Processor
from llava_jax.data.video import VIDEO_LAYOUTS, video_layout_for
from llava_jax.data.video_io import num_frames_for, read_video
from llava_jax.errors import LlavaJaxError
from llava_jax.infer.backend import inference_dtype
from llava_jax.infer.generate import Engine, Prompt
from llava_jax.infer.sampling import SamplingParams
from llava_jax.infer.textstream import TextStream

DEFAULT_TEMPLATE = "vicuna_v1"


@dataclasses.dataclass
class Session:
  """What serving a model folder needs: the engine and the processor (which renders conversations); a video
  model's videos are sampled to `num_frames` frames (None: the model takes no videos)."""
  engine: Engine
  processor: Processor
  num_frames: int | None = None

  def load_videos(self, paths: Sequence[str]) -> list[np.ndarray]:
    """Video files or frames folders -> their sampled frames."""
    if paths and self.num_frames is None:
      raise LlavaJaxError(f"a {self.engine.config.model_type} model takes no videos "
                          f"(video models: {', '.join(VIDEO_LAYOUTS)})")
    return [read_video(path, self.num_frames) for path in paths]


def load_session(path: str, mesh: Mesh | None = None, adapter: str | None = None,
                 num_frames: int | None = None, dtype: str = "auto") -> Session:
  """Loads weights, tokenizer, image processor and chat template of a model folder.

  The engine computes in `dtype` (--dtype; auto: the backend's, see infer/backend.py) and holds the weights in it
  only, converted once on the host from their stored dtype.

  With a mesh, the engine splits the weights over it (see generate.Engine). A LoRA model (a LoRA run's workdir,
  or the base with `adapter`, a PEFT / LLaVA LoRA folder) runs its adapters through the LoRA layers rather than
  merged into the kernels: the same path for both, a QLoRA base stays quantized in memory, and the adapters add
  only rank/width of the layers' work. `num_frames` (--num-frames) overrides the folder's video frame count.
  """
  from llava_jax.weights.model_folder import load_model
  dtype = inference_dtype(dtype)  # a bad one fails before the weights load
  loaded = load_model(path, adapter=adapter)
  config = loaded.config
  template = _config_template(loaded.config_path) or DEFAULT_TEMPLATE
  video_layout = video_layout_for(config) if config.model_type in VIDEO_LAYOUTS else None
  processor = Processor.from_folder(loaded.assets_dir, layout_for(config), image_size=config.vision.image_size,
                                    fallback_template=template, video_layout=video_layout)
  frames = num_frames_for(loaded.assets_dir, config.model_type, num_frames) if video_layout else None
  config = config.replace(dtype=dtype)
  # Host views (the engine converts and places the weights: on one device, or each device only its slice).
  params = jax.tree.map(np.asarray, loaded.params)
  engine = Engine(config, params, eos_token_ids=_eos_ids(loaded.assets_dir, config, processor),
                  pad_token_id=config.pad_token_id if config.pad_token_id is not None else processor.pad_token_id,
                  mesh=mesh)
  return Session(engine, processor, frames)


def _config_template(config_path: str | None) -> str | None:
  """The conversation template a llava-jax checkpoint names in config.json (`llava_jax.template`)."""
  if not config_path or not os.path.isfile(config_path):
    return None
  with open(config_path) as f:
    extras = json.load(f).get("llava_jax") or {}
  return extras.get("template") if isinstance(extras, dict) else None


def _eos_ids(folder: str, config, processor: Processor) -> tuple[int, ...]:
  """EOS ids as transformers' generate sees them: generation_config.json, else the model config."""
  path = os.path.join(folder, "generation_config.json")
  eos = None
  if os.path.isfile(path):
    eos = images_lib.read_json(path).get("eos_token_id")
  if eos is None:
    eos = config.eos_token_id
  if eos is None:
    eos = processor.tokenizer.eos_token_id
  return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))


def load_images(paths: Sequence[str]) -> list:
  return [images_lib.load_image(p) for p in paths]


def stream_text(session: Session, prompt: Prompt, max_new_tokens: int, sampling: SamplingParams,
                stop: Sequence[str] = ()) -> Iterator[str]:
  """Yields the generated text in pieces as tokens arrive; ends at EOS, N tokens or a stop string."""
  text = TextStream(session.processor.decode, stop)
  for chunk in session.engine.stream([prompt], max_new_tokens, sampling):
    piece = text.feed(chunk[0])
    if piece:
      yield piece
    if text.stopped:
      return
  tail = text.finish()
  if tail:
    yield tail


def generate_command(model: str, images: Sequence[str], prompt: str, raw: bool, max_new_tokens: int,
                     temperature: float, top_p: float, top_k: int, seed: int, out: IO[str],
                     repetition_penalty: float = 1.0, mesh: Mesh | None = None, adapter: str | None = None,
                     videos: Sequence[str] = (), num_frames: int | None = None, dtype: str = "auto") -> None:
  """Prints only the generated text to `out` (streamed); progress goes to stderr."""
  sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed)
  if max_new_tokens < 1:
    raise LlavaJaxError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
  if not os.path.exists(model):
    raise LlavaJaxError(f"{model}: no such model folder")
  if num_frames is not None and num_frames < 1:
    raise LlavaJaxError(f"--num-frames must be >= 1, got {num_frames}")
  for tag, given, kind in (("<image>", images, "image"), ("<video>", videos, "video")):
    if raw and prompt.count(tag) != len(given):  # the contract's tags; checked before loading anything
      raise LlavaJaxError(f"--raw prompt has {prompt.count(tag)} {tag} tag(s) but {len(given)} "
                          f"{kind}(s) were given; they must match")
  missing = [v for v in videos if not os.path.exists(v)]
  if missing:
    raise LlavaJaxError(f"{missing[0]}: video file or frames folder not found")
  pictures = load_images(images)  # before loading weights: a bad image fails fast
  session = load_session(model, mesh, adapter, num_frames, dtype)
  clips = session.load_videos(videos)
  inputs = session.processor.prepare(prompt, pictures, raw=raw, names=images, videos=clips)
  print(f"llava-jax: prompt of {len(inputs.input_ids)} tokens, {len(pictures)} image(s), {len(clips)} video(s)",
        file=sys.stderr)
  request = Prompt.of(inputs)
  for piece in stream_text(session, request, max_new_tokens, sampling):
    out.write(piece)
    out.flush()
  out.write("\n")
  out.flush()
