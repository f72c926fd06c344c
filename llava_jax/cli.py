"""The `llava-jax` command line: parse, call the library, print. Nothing else lives here.

Bad input anywhere below raises LlavaJaxError; it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from llava_jax.errors import LlavaJaxError
from llava_jax.sizes import parse_bytes


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2 (argparse would print the whole usage)
    raise LlavaJaxError(f"{self.prog}: {message}")


CONVERT_PATHS = {"hf-to-jax": "HF_DIR OUT_DIR", "jax-to-hf": "CKPT_OR_WORKDIR OUT_DIR",
                 "llava-to-hf": "LLAVA_DIR OUT_DIR", "merge-lora": "BASE ADAPTER_DIR OUT_DIR",
                 "jax-to-peft": "LORA_WORKDIR OUT_DIR"}


def _convert(args) -> None:
  from llava_jax.weights import convert
  usage = CONVERT_PATHS[args.direction]
  if len(args.paths) != len(usage.split()):
    raise LlavaJaxError(f"convert {args.direction}: expected {usage}, got {len(args.paths)} path(s)")
  *src, out = args.paths
  shard_bytes = lambda: parse_bytes(args.max_shard_size, "--max-shard-size")
  if args.direction == "hf-to-jax":
    convert.hf_to_jax(src[0], out)
  elif args.direction == "jax-to-hf":
    convert.jax_to_hf(src[0], out, dtype=args.dtype, max_shard_bytes=shard_bytes())
  elif args.direction == "merge-lora":
    convert.merge_lora(src[0], src[1], out, dtype=args.dtype, max_shard_bytes=shard_bytes())
  elif args.direction == "jax-to-peft":
    convert.jax_to_peft(src[0], out, base_model=args.base_model)
  else:
    convert.llava_to_hf(src[0], out, vision_tower=args.vision_tower)
  print(out)


def _mesh(text: str | None, devices=None):
  """The device mesh a --mesh flag asks for (None: one device), over `devices` (default: all); bad specs fail
  before any loading."""
  if text is None:
    return None
  from llava_jax import sharding
  return sharding.mesh_from_flag(text, devices)


def _generate(args) -> None:
  from llava_jax.infer import run
  mesh = _mesh(args.mesh)
  run.generate_command(
      model=args.model, images=args.image, prompt=args.prompt, raw=args.raw, max_new_tokens=args.max_new_tokens,
      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, out=sys.stdout, mesh=mesh,
      adapter=args.adapter, videos=args.video, num_frames=args.num_frames, dtype=args.dtype)


def _chat(args) -> None:
  from llava_jax.infer import chat
  mesh = _mesh(args.mesh)
  chat.chat_command(model=args.model, image=args.image, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, inp=sys.stdin, out=sys.stdout, mesh=mesh, adapter=args.adapter,
                    video=args.video, num_frames=args.num_frames, dtype=args.dtype)


def _serve(args) -> None:
  from llava_jax.infer.serve import command
  mesh = _mesh(args.mesh)
  command.serve_command(model=args.model, host=args.host, port=args.port, max_batch=args.max_batch,
                        batch_wait_ms=args.batch_wait_ms, model_id=args.served_model_name, mesh=mesh,
                        adapter=args.adapter, num_frames=args.num_frames, allow_local_media=args.allow_local_media,
                        dtype=args.dtype)


def _eval(args) -> None:
  import jax
  from llava_jax.eval import runner
  from llava_jax.eval.judge import JudgeClient
  from llava_jax.train import hosts
  judge = JudgeClient.from_flags(args.judge_url, args.judge_model, args.judge_key_env)
  hosts.initialize_distributed()  # a multi-process job: each process answers its share on its own devices
  mesh = _mesh(args.mesh, jax.local_devices())
  runner.eval_command(model=args.model, task_names=args.task, data=args.data, out=args.out, batch_size=args.batch_size,
                      limit=args.limit, max_new_tokens=args.max_new_tokens, mesh=mesh, judge=judge,
                      answer_format=not args.no_answer_format, dtype=args.dtype)


def _demo(args) -> None:
  from llava_jax import demo
  demo.demo_command(workdir=args.workdir, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="llava-jax",
                   description="LLaVA in JAX: convert, generate, chat, serve, train, plan, eval, demo.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  p = sub.add_parser("convert", help="convert checkpoints between Hugging Face and llava-jax formats")
  p.add_argument("direction", choices=list(CONVERT_PATHS))
  p.add_argument("paths", nargs="+", metavar="PATH",
                 help="; ".join(f"{k}: {v}" for k, v in CONVERT_PATHS.items()) + " (OUT_DIR must not exist)")
  p.add_argument("--vision-tower", help="llava-to-hf: the CLIP or SigLIP vision model folder the release names")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                 help="jax-to-hf, merge-lora: tensor dtype to write (default: as stored)")
  p.add_argument("--max-shard-size", default="5GB",
                 help="jax-to-hf, merge-lora: largest safetensors shard (default 5GB)")
  p.add_argument("--base-model", help="jax-to-peft: base_model_name_or_path to record in adapter_config.json")
  p.set_defaults(func=_convert)

  def add_sampling(p):
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k")
    p.add_argument("--seed", type=int, default=0)

  def add_adapter(p):
    p.add_argument("--adapter", metavar="DIR",
                   help="a LoRA adapter to apply to the model: a PEFT folder (adapter_config.json, "
                        "adapter_model.safetensors) or a LLaVA LoRA release (+ non_lora_trainables.bin)")

  def add_video(p, help_video):
    p.add_argument("--video", **help_video)
    add_num_frames(p)

  def add_num_frames(p):
    p.add_argument("--num-frames", type=int, metavar="N",
                   help="frames sampled uniformly from each video (default: the model folder's num_frames, else 32 "
                        "for llava_onevision, 8 for llava_next_video)")

  def add_dtype(p):
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype, the only one the weights are held in (default auto: bfloat16 on a GPU or TPU, "
                        "float32 on a CPU)")

  def add_mesh(p):
    p.add_argument("--mesh", metavar="AXIS=SIZE,...",
                   help="split the model over a device mesh, e.g. fsdp=2,tensor=4 (axes data, fsdp, tensor as in the "
                        "training config's mesh.*; unnamed axes are 1, one may be -1 = the remaining devices)")

  p = sub.add_parser("generate", help="answer one prompt about one or more images")
  p.add_argument("--model", required=True, help="HF folder, llava-jax checkpoint, or training workdir")
  p.add_argument("--image", action="append", default=[], help="image file; repeat for several")
  p.add_argument("--prompt", required=True)
  p.add_argument("--raw", action="store_true",
                 help="use the prompt verbatim (one <image> per --image, one <video> per --video)")
  add_video(p, dict(action="append", default=[], metavar="FILE",
                    help="video file (mp4, webm, ...) or folder of frame images; repeat for several"))
  add_sampling(p)
  add_adapter(p)
  add_dtype(p)
  add_mesh(p)
  p.set_defaults(func=_generate)

  p = sub.add_parser("chat", help="interactive conversation (/image PATH, /video PATH, /reset, /quit)")
  p.add_argument("--model", required=True)
  p.add_argument("--image")
  add_video(p, dict(metavar="FILE", help="video file or frames folder for the first message"))
  p.add_argument("--max-new-tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=0.0)
  add_adapter(p)
  add_dtype(p)
  add_mesh(p)
  p.set_defaults(func=_chat)

  p = sub.add_parser("serve", help="OpenAI-compatible chat server: POST /v1/chat/completions, GET /v1/models")
  p.add_argument("--model", required=True, help="HF folder, llava-jax checkpoint, or training workdir")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--max-batch", type=int, default=8, help="most requests decoded together (default 8)")
  p.add_argument("--batch-wait-ms", type=float, default=10.0,
                 help="how long to gather concurrent requests into one batch (default 10)")
  p.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
  p.add_argument("--allow-local-media", metavar="DIR",
                 help="also accept video_url parts naming a video file or frames folder under DIR "
                      "(default: data: URLs only)")
  add_num_frames(p)
  add_adapter(p)
  add_dtype(p)
  add_mesh(p)
  p.set_defaults(func=_serve)

  # `train` and `plan` take absl flags (--config FILE.py:ARGS --config.KEY=V ...); main() hands them
  # over unparsed, since argparse cannot pass through options it does not know.
  sub.add_parser("train", help="train with a config file: --config FILE.py:ARGS --workdir DIR [--config.KEY=V]")
  sub.add_parser("plan", help="per-device memory and FLOPs of a config's train step on a mesh, compiled on fake CPU "
                             "devices: --config FILE.py:ARGS --mesh fsdp=N[,...] [--device-memory 80GB] --out FILE")

  p = sub.add_parser("eval", help="answer and score benchmarks (LLaVA-1.5 protocol; LLaVA's evaluation layout or "
                                  "lmms-lab exports)")
  p.add_argument("--model", required=True, help="HF folder, llava-jax checkpoint, or training workdir")
  p.add_argument("--task", required=True, help="comma-separated: pope, mme, scienceqa_img, gqa, textvqa, vqav2, "
                                              "vizwiz, mmbench, seed_image, llava_bench, mm_vet")
  p.add_argument("--data", required=True, help="LLaVA's playground/data/eval folder or lmms-lab's exports (one "
                                              "subfolder per benchmark)")
  p.add_argument("--out", required=True, help="results folder: results.json, TASK/answers.jsonl (a rerun resumes)")
  p.add_argument("--batch-size", type=int, default=8, help="questions per compiled batch (default 8)")
  p.add_argument("--limit", type=int, help="only the first N questions of each task")
  p.add_argument("--max-new-tokens", type=int, help="default per task: 128 (LLaVA's), 1024 for llava_bench, mm_vet")
  p.add_argument("--judge-url", metavar="URL",
                 help="llava_bench, mm_vet: judge the answers with this OpenAI-compatible endpoint "
                      "(e.g. https://api.openai.com/v1)")
  p.add_argument("--judge-model", metavar="NAME", help="the judge's model (the papers used GPT-4)")
  p.add_argument("--judge-key-env", metavar="VAR",
                 help="environment variable holding the judge's API key (default: OPENAI_API_KEY, if set)")
  p.add_argument("--no-answer-format", action="store_true",
                 help="ask without LLaVA-1.5's answer-format instruction (models not trained with it: the demo's)")
  add_dtype(p)
  add_mesh(p)
  p.set_defaults(func=_eval)

  p = sub.add_parser("demo", help="train a miniature LLaVA from nothing on ShapesWorld and evaluate it")
  p.add_argument("--workdir", default="demo_workdir")
  p.add_argument("--quick", action="store_true", help="a smaller, faster run (about 2 minutes)")
  p.set_defaults(func=_demo)
  return parser


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  try:
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv[1:]):
      from llava_jax.train import main as train_main
      train_main.run(argv[1:])
      return
    if argv[:1] == ["plan"] and not {"-h", "--help"} & set(argv[1:]):
      from llava_jax import plan
      plan.run(argv[1:])
      return
    args = build_parser().parse_args(argv)
    args.func(args)
  except LlavaJaxError as e:
    print(f"llava-jax: error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
