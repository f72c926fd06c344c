"""`llava-jax plan`: what one training step needs on each device of a mesh, found without the devices.

    llava-jax plan --config configs/llava_v1_5.py:stage=finetune,size=7b --mesh fsdp=8 \
        [--device-memory 80GB] --out plan.json [--config.KEY=VALUE ...]

The step `llava-jax train` would run (the trainer of `train/build.build_trainer`) is compiled for the
config's largest batch (batch_size rows of data.max_len tokens, the most image tiles) on a mesh of fake CPU
devices, from shapes alone: no weight is ever allocated. Per device it reports the parameters, optimizer
state and gradients (from their shapes and shardings), the batch, XLA's temporaries, the total against
--device-memory, and the step's model FLOPs. The architecture is the config's `model`; `init` is not read.

Fake devices: JAX is told to use the CPU only and to make as many CPU devices as the mesh has
(`jax_num_cpu_devices`, what XLA_FLAGS=--xla_force_host_platform_device_count sets), before anything
starts a backend. The command is a process of its own, so nothing has.

XLA:CPU against GPU/TPU: XLA:CPU has no bfloat16 arithmetic, so it converts each bf16 parameter the step reads
(a frozen base stored bf16, `frozen_dtype`) to float32 once, before the layer loops, and holds those copies
through the step; with a bf16 compute dtype a GPU or TPU reads the bf16 parameter itself. The accelerator
figures leave these copies out (`xla_cpu.bf16_argument_upcasts`, found in the compiled program). For
LLaVA-1.5-7B LoRA over a bf16 base (16 x 2048 tokens, remat full) they were 28.2 GB, and without them the
LoRA and QLoRA plans (QLoRA's quantized kernels are dequantized layer by layer, inside the loop) have the same
activations at 1, 4 and 16 rows per microbatch, as they should: the two differ only in how the frozen kernels
are stored. Not yet checked on a GPU. Also, the optimizer's elementwise work on the gradients (the division by
the target token count, the clipping scale, AdamW) is fused into the update of each parameter on a GPU or TPU, so
the gradients exist once; XLA:CPU materializes the scaled gradients as a second full copy beside the
raw ones. For LLaVA-1.5-7B stage 2 (batch 4 x 1024, remat full, one device) XLA's memory analysis on an
H200 gave 29.09 GB of temporaries (the 27.05 GB of gradients and 2.0 GB of activations), exactly the
peak measured there (111.43 GB), where XLA:CPU's gives 53.96 GB. The accelerator figures therefore count
XLA:CPU's temporaries less one copy of the gradients, except with gradient accumulation, where both
backends hold the accumulator beside the microbatch's gradients and XLA:CPU adds none (its total was 3%
over the H200's there); the CPU's own are kept under `xla_cpu`.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Sequence

from llava_jax.errors import LlavaJaxError
from llava_jax.sizes import parse_bytes

MAX_DEVICES = 2048  # fake CPU devices one plan may make (a large TPU slice); more only costs compile time
DEFAULT_DEVICE_MEMORY = "80GB"


def run(argv: Sequence[str]) -> None:
  """`llava-jax plan ARGV`: parse, plan, write --out atomically, print the table."""
  from llava_jax import fileio  # pylint: disable=import-outside-toplevel
  config, mesh, device_memory, out, decode = parse_flags(argv)
  use_cpu_devices(math.prod(mesh.values()))
  report = plan(config, device_memory, decode)
  report["command"] = "llava-jax plan " + " ".join(argv)
  fileio.write_json_atomic(report, out)
  print(table(report))


def parse_flags(argv: Sequence[str]):
  """(config with the mesh set, mesh spec, device memory in bytes, --out path); LlavaJaxError on bad input."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from llava_jax.train import main  # pylint: disable=import-outside-toplevel

  def define(values):
    flags.DEFINE_string("mesh", None, "data=N,fsdp=N,tensor=N: the devices to plan for", flag_values=values)
    flags.DEFINE_string("device_memory", DEFAULT_DEVICE_MEMORY, "one device's memory, e.g. 16GiB, 80GB",
                        flag_values=values)
    flags.DEFINE_string("out", None, "the JSON report to write", flag_values=values)
    flags.DEFINE_integer("decode_batch", 1, "rows of the generation batch planned beside the train step",
                         flag_values=values)
    flags.DEFINE_integer("decode_new_tokens", 512, "new tokens the generation batch's KV cache holds",
                         flag_values=values)

  config, values = main.parse_config_flags("plan", [_underscored(a) for a in argv], define)
  if not values.mesh:
    raise LlavaJaxError("plan: --mesh data=N,fsdp=N,tensor=N is required")
  if not values.out:
    raise LlavaJaxError("plan: --out FILE is required")
  mesh = parse_mesh(values.mesh)
  for axis, size in mesh.items():
    config.mesh[axis] = size
  if values.decode_batch < 1 or values.decode_new_tokens < 1:
    raise LlavaJaxError(f"plan: --decode-batch and --decode-new-tokens must be >= 1, got {values.decode_batch} "
                        f"and {values.decode_new_tokens}")
  decode = {"batch": values.decode_batch, "new_tokens": values.decode_new_tokens}
  return config, mesh, parse_bytes(values.device_memory, "--device-memory"), values.out, decode


HYPHENATED_FLAGS = ("--device-memory", "--decode-batch", "--decode-new-tokens")


def _underscored(arg: str) -> str:
  """`--device-memory=X` -> `--device_memory=X` (absl's names), for the flags documented with hyphens."""
  for flag in HYPHENATED_FLAGS:
    if arg == flag or arg.startswith(flag + "="):
      return "--" + flag[2:].replace("-", "_") + arg[len(flag):]
  return arg


def parse_mesh(text: str) -> dict[str, int]:
  """`fsdp=8` -> every axis's size, each at least 1 (a plan has no devices to fill a -1 with)."""
  from llava_jax import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.parse_mesh(text)
  if any(size < 1 for size in mesh.values()):
    raise LlavaJaxError(f"--mesh {text!r}: every axis needs a size of at least 1 (the mesh is what is planned for)")
  if math.prod(mesh.values()) > MAX_DEVICES:
    raise LlavaJaxError(f"--mesh {text!r}: {math.prod(mesh.values())} devices; plan makes at most {MAX_DEVICES}")
  return mesh


def use_cpu_devices(count: int) -> None:
  """Makes JAX start `count` CPU devices and no accelerator; fails if a backend is already running."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:
    pass  # a backend is running already; the check below says whether it is the one wanted
  devices = jax.devices()
  if len(devices) != count or devices[0].platform != "cpu":
    raise LlavaJaxError(f"plan: needs a fresh process (JAX already runs {len(devices)} {devices[0].platform} "
                        f"device(s), the mesh needs {count} CPU devices)")


def batch_shapes(cfg, model_config, mesh) -> dict:
  """The global batch the pipeline's largest bucket gives, as ShapeDtypeStructs split over the batch axes."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from llava_jax import sharding  # pylint: disable=import-outside-toplevel
  from llava_jax.data import layouts  # pylint: disable=import-outside-toplevel
  from llava_jax.data.pipeline import FEATURE_INDEX, FEATURE_WEIGHTS  # pylint: disable=import-outside-toplevel
  from llava_jax.image_tokens import MIX_TAPS  # pylint: disable=import-outside-toplevel
  layout = layouts.layout_for(model_config)
  rows, length = cfg.batch_size, cfg.data.max_len
  tiles = cfg.data.max_tiles or cfg.data.max_images * layouts.max_tiles_per_image(layout)
  size = model_config.vision.image_size
  shapes = {"input_ids": ((rows, length), np.int32), "attention_mask": ((rows, length), np.int32),
            "loss_mask": ((rows, length), np.float32), "pixel_values": ((rows, tiles, size, size, 3), np.float32)}
  taps = (MIX_TAPS,) if layouts.mixes_features(layout) else ()
  if layouts.orders_features_by_size(layout):
    shapes[FEATURE_INDEX] = ((rows, length) + taps, np.int32)
  if taps:
    shapes[FEATURE_WEIGHTS] = ((rows, length) + taps, np.float32)
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for key, (shape, dtype) in shapes.items()}


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard; all are equal here)."""
  import jax  # pylint: disable=import-outside-toplevel
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def model_flops(params: Any, trains: Any, model_config, batch: dict) -> float:
  """FLOPs of one step's matmuls and attention, without recomputation (so remat does not change it).

  Each weight matmul (a kernel, a LoRA factor) costs 2 x tokens x the weight's size forward, the same again for
  the gradient of its input (when some trained parameter lies in its tower or before) and of its weight (when it
  trains: not a LoRA run's frozen kernels); attention costs
  its two score/context products forward and twice that backward. Padding tokens count: they are computed.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from llava_jax.train import optim  # pylint: disable=import-outside-toplevel
  rows, length = batch["input_ids"].shape
  tiles = rows * batch["pixel_values"].shape[1]
  v, t = model_config.vision, model_config.text
  tower_tokens = v.num_patches + v.class_tokens
  towers = {  # tower -> (tokens through its weights, attention FLOPs forward)
      "vision_tower": (tiles * tower_tokens, v.num_hidden_layers * tiles * 4 * tower_tokens ** 2 * v.hidden_size),
      "projector": (tiles * model_config.tokens_per_tile, 0),
      "language_model": (rows * length, t.num_hidden_layers * rows * 4 * length * (length + 1) / 2
                         * t.num_attention_heads * t.head_dim),
  }
  weights, trained = {}, {}  # tower -> [(matmul weight size, trains?)]; tower -> does any of its parameters train
  for path, leaf, train in zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(params),
                               jax.tree.leaves(trains)):
    tower = path.split("/")[0]
    trained[tower] = trained.get(tower, False) or bool(train)
    size = _matmul_size(path, leaf.shape, model_config)
    if size:
      weights.setdefault(tower, []).append((size, bool(train)))
  total, upstream_trains = 0.0, False
  for tower, (tokens, attention) in towers.items():  # in the order the data flows
    upstream_trains = upstream_trains or trained.get(tower, False)
    total += sum(2 * tokens * size * (1 + upstream_trains + trains) for size, trains in weights.get(tower, ()))
    total += attention * (3 if upstream_trains else 1)
  return total


def _matmul_size(path: str, shape: tuple, model_config) -> int:
  """Multiply-adds per token of the matmul whose weight this parameter is: a kernel's size, a quantized kernel's
  counted from its scales (one per lora.group_size inputs), each LoRA factor's own; 0 for other parameters."""
  leaf = path.rsplit("/", 1)[-1]
  if leaf in ("kernel", "lora_a", "lora_b"):
    return math.prod(shape)
  if leaf == "kernel_scale":
    return math.prod(shape) * model_config.lora.group_size
  return 0


def bf16_argument_upcasts(hlo_text: str) -> int:
  """Bytes of the float32 copies a compiled XLA:CPU program makes of whole bfloat16 arguments (see the module
  docstring): the float32 converts, in its entry computation, whose operand is a bf16 parameter of it."""
  entry = hlo_text[hlo_text.index("\nENTRY "):]
  entry = entry[:entry.find("\n}") + 1 or None]
  arguments = set(re.findall(r"(%[\w.\-]+) = bf16\[[\d,]*\]\S* parameter\(", entry))
  total = 0
  for dims, converted, fused in re.findall(r"= f32\[([\d,]*)\]\S* (?:convert\((%[\w.\-]+)\)|fusion\((%[\w.\-]+)\), "
                                           r"kind=kLoop, calls=%wrapped_convert_computation)", entry):
    if (converted or fused) in arguments:
      total += 4 * math.prod(int(d) for d in dims.split(",") if d)
  return total


def memory_bytes(compiled) -> dict:
  """XLA's memory analysis of a compiled program: its arguments, outputs, aliased bytes, temporaries and
  the total they make (arguments + outputs - aliased + temporaries)."""
  memory = compiled.memory_analysis()
  held = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
          "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes}
  return dict(held, total=held["arguments"] + held["outputs"] - held["aliased"] + held["temporaries"])


def plan(cfg, device_memory: int, decode: dict | None = None) -> dict:
  """The report for `cfg` (its mesh is the devices JAX runs) against `device_memory` bytes per device;
  with `decode` ({"batch", "new_tokens"}), also the generation program's (see `plan_decode`)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from llava_jax.train import build  # pylint: disable=import-outside-toplevel
  build.check_config(cfg, needs_source=False)
  model_config = build.runtime_model_config(cfg, build.named_model(cfg.model))
  trainer = build.build_trainer(cfg, model_config, max(int(cfg.total_steps), 1))
  state = trainer.abstract_state()
  batch = batch_shapes(cfg, model_config, trainer.mesh)
  started = time.perf_counter()
  compiled = trainer.compile(state, batch)
  compile_s = time.perf_counter() - started

  params = nn.unbox(trainer.abstract_params)
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  trainable = [p for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(trainer.mask)) if m]
  held = {"parameters": per_device_bytes(state.params), "optimizer_state": per_device_bytes(state.opt_state),
          "gradients": per_device_bytes(trainable),  # float32 like their parameters, sharded like them
          "batch": per_device_bytes(batch)}
  xla_cpu = memory_bytes(compiled)
  # Less XLA:CPU's float32 copies of bf16 parameters (bf16 compute only: float32 compute asks for them) and its
  # second copy of the gradients (module docstring); they stay counted once. With accumulation every backend
  # holds the accumulator beside the microbatch's gradients: no extra copy.
  upcasts = bf16_argument_upcasts(compiled.as_text()) if cfg.dtype == "bfloat16" else 0
  temporaries = xla_cpu["temporaries"] - upcasts
  if cfg.grad_accum_steps == 1:
    temporaries = max(temporaries - held["gradients"], held["gradients"])
  activations = temporaries - held["gradients"]
  total = xla_cpu["total"] - xla_cpu["temporaries"] + temporaries
  devices = math.prod(trainer.mesh.shape.values())
  flops = model_flops(params, trainer.mask, model_config, batch)
  report = {
      "config": {"stage": cfg.stage, "model": cfg.model, "dtype": cfg.dtype, "frozen_dtype": build.frozen_dtype(cfg),
                 "remat_policy": cfg.remat_policy, "batch_size": cfg.batch_size, "max_len": cfg.data.max_len,
                 "tiles_per_row": batch["pixel_values"].shape[1], "grad_accum_steps": cfg.grad_accum_steps},
      "mesh": dict(trainer.mesh.shape), "devices": devices,
      "rows_per_device_per_microbatch": cfg.batch_size // (devices // trainer.mesh.shape["tensor"])
                                        // cfg.grad_accum_steps,
      "parameters": {"count": count(params), "trainable": sum(math.prod(x.shape) for x in trainable)},
      "per_device_bytes": dict(held, activations_and_workspace=activations, temporaries=temporaries, total=total),
      "xla_cpu": dict(xla_cpu, bf16_argument_upcasts=upcasts),
      "device_memory_bytes": device_memory, "fits": total <= device_memory,
      "model_flops_per_step": flops, "model_flops_per_device": flops / devices,
      "compile_s": round(compile_s, 1),
  }
  if decode is not None:
    report["decode"] = plan_decode(model_config, trainer.mesh, cfg.data.max_len, device_memory, **decode)
  return report


def plan_decode(model_config, mesh, prompt_tokens: int, device_memory: int, batch: int, new_tokens: int) -> dict:
  """The first program a generation request runs on the same mesh (prefill of `batch` prompts of
  `prompt_tokens` (data.max_len), one image tile's tokens among them, and the first token, into a KV cache with
  room for `new_tokens` more), in the accelerators' inference layout (infer/backend.py), from XLA's memory
  analysis per device. Its inputs are the weights as the engine holds them (once, in the config's compute dtype:
  `weights`) and the prompts; its outputs the KV cache and the decode state. As for the train step, the float32
  copies XLA:CPU makes of whole bf16 arguments are left out of the temporaries (`xla_cpu_bf16_argument_upcasts`)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from llava_jax.infer import backend  # pylint: disable=import-outside-toplevel
  from llava_jax.infer.generate import Engine, Prompt  # pylint: disable=import-outside-toplevel
  from llava_jax.models.llava import abstract_params  # pylint: disable=import-outside-toplevel
  layout = backend.layout_for("gpu")
  engine = Engine(model_config, nn.unbox(abstract_params(model_config)), eos_token_ids=(), mesh=mesh, layout=layout)
  image_tokens = model_config.tokens_per_tile
  ids = np.ones(prompt_tokens, np.int32)
  ids[1:1 + image_tokens] = model_config.image_token_index
  size = model_config.vision.image_size
  prompt = Prompt(ids, np.zeros((1, size, size, 3), np.float32), np.arange(image_tokens, dtype=np.int32))
  prompts = [prompt] * batch
  compiled = engine.lower_start(prompts, new_tokens).compile()
  memory = memory_bytes(compiled)
  upcasts = bf16_argument_upcasts(compiled.as_text())
  memory["temporaries"] -= upcasts
  memory["total"] -= upcasts
  return {"layout": layout.name, "dtype": model_config.dtype, "batch": batch, "prompt_tokens": prompt_tokens,
          "new_tokens": new_tokens, "weights": per_device_bytes(engine.params),
          "per_device_bytes": {k: memory[k] for k in ("arguments", "outputs", "temporaries", "total")},
          "xla_cpu_bf16_argument_upcasts": upcasts, "fits": memory["total"] <= device_memory}


def table(report: dict) -> str:
  gb = lambda n: f"{n / 1e9:10.2f} GB"
  b = report["per_device_bytes"]
  rows = [("parameters", b["parameters"]), ("optimizer state", b["optimizer_state"]),
          ("gradients", b["gradients"]), ("batch", b["batch"]),
          ("activations + workspace", b["activations_and_workspace"]), ("total", b["total"]),
          ("device memory", report["device_memory_bytes"])]
  c = report["config"]
  lines = [f"{c['model']} {c['stage']}, batch {c['batch_size']} x {c['max_len']} tokens, remat {c['remat_policy']}, "
           f"mesh {','.join(f'{k}={v}' for k, v in report['mesh'].items())} ({report['devices']} devices); "
           "per device:"]
  lines += [f"  {name:<24s}{gb(value)}" for name, value in rows]
  lines.append(f"  fits: {'yes' if report['fits'] else 'no'}; model FLOPs per step "
               f"{report['model_flops_per_step'] / 1e12:.1f} T ({report['model_flops_per_device'] / 1e12:.1f} T "
               f"per device); XLA:CPU's own total {report['xla_cpu']['total'] / 1e9:.2f} GB")
  d = report.get("decode")
  if d:
    m = d["per_device_bytes"]
    lines.append(f"generation ({d['layout']} layout, {d['dtype']}), batch {d['batch']} x {d['prompt_tokens']} prompt "
                 f"tokens + {d['new_tokens']} new, per device: weights {d['weights'] / 1e9:.2f} GB, weights and "
                 f"inputs {m['arguments'] / 1e9:.2f} GB, KV cache "
                 f"and state {m['outputs'] / 1e9:.2f} GB, temporaries {m['temporaries'] / 1e9:.2f} GB, total "
                 f"{m['total'] / 1e9:.2f} GB; fits: {'yes' if d['fits'] else 'no'}")
  return "\n".join(lines)
