"""How the inference programs lay out their work, per backend: the ONE place these choices live.

The tunings measured on a 2-core CPU (benchmarks/README.md) do not all carry over to an accelerator:
- row-by-row prefill: without a mesh, a batch is prefilled one row after another (`lax.map`):
  XLA:CPU's matmuls ran ~20% faster on one row's ~600 tokens than on 8 rows' ~5000; on a GPU it
  serializes the device (batch-16 time to first token 0.90x transformers' on an H200).
- unrolled layers: per-layer weights and caches instead of the stacked (scanned) ones, which XLA:CPU
  copies slice by slice before every matmul of a decode step (compile time grows with depth).
- output-first kernels: language-model kernels stored (out, in) and applied by `layers.weight_dot`
  behind an optimization barrier, the fast matrix-vector form on XLA:CPU; needs unrolled layers.
- the compute dtype (`--dtype auto`): bfloat16 on an accelerator, float32 on XLA:CPU, which has no bf16
  arithmetic (it converts bf16 operands to float32 first). The engine holds its weights in that dtype only.

`Engine` takes the layout of `jax.default_backend()` unless given one (a name of LAYOUTS or an
InferenceLayout); benchmarks/gpu.py times the others against it.
"""

from __future__ import annotations

import dataclasses

import jax

from llava_jax.config import LlavaConfig
from llava_jax.errors import LlavaJaxError
from llava_jax.models.llama import kernels_out_first
from llava_jax.models.llava import unstack_layers


@dataclasses.dataclass(frozen=True)
class InferenceLayout:
  name: str
  row_by_row_prefill: bool  # without a mesh (on a mesh the rows are split over devices and run at once)
  unrolled_layers: bool
  out_first_kernels: bool

  def __post_init__(self):
    if self.out_first_kernels and not self.unrolled_layers:
      raise LlavaJaxError(f"inference layout {self.name!r}: output-first kernels need unrolled layers")

  def model_config(self, config: LlavaConfig) -> LlavaConfig:
    """The model that runs inference in this layout (no rematerialization: nothing is differentiated)."""
    return config.replace(scan_layers=not self.unrolled_layers, out_first_kernels=self.out_first_kernels,
                          remat_policy="none")

  def params(self, params: dict) -> dict:
    """Checkpoint-layout parameters (scanned layers, kernels input first) -> this layout's."""
    if self.unrolled_layers:
      params = unstack_layers(params)
    if self.out_first_kernels:
      params = kernels_out_first(params)
    return params


LAYOUTS = {layout.name: layout for layout in (
    InferenceLayout("cpu", row_by_row_prefill=True, unrolled_layers=True, out_first_kernels=True),
    InferenceLayout("batched", row_by_row_prefill=False, unrolled_layers=True, out_first_kernels=True),
    InferenceLayout("unrolled", row_by_row_prefill=False, unrolled_layers=True, out_first_kernels=False),
    InferenceLayout("scanned", row_by_row_prefill=False, unrolled_layers=False, out_first_kernels=False),
)}
# Backends not named here get "batched": the CPU's decode layout (its batch-1 decode reached 90% of an
# H200's copy bandwidth) without the row-by-row prefill.
BACKEND_LAYOUTS = {"cpu": "cpu"}
DEFAULT_LAYOUT = "batched"


def layout_for(backend: str | None = None) -> InferenceLayout:
  """The layout of `backend` (default: jax.default_backend())."""
  return LAYOUTS[BACKEND_LAYOUTS.get(backend or jax.default_backend(), DEFAULT_LAYOUT)]


DTYPES = ("float32", "bfloat16")
# XLA:CPU has no bf16 arithmetic: it would convert bf16 weights to float32 for every product.
BACKEND_DTYPES = {"cpu": "float32"}
DEFAULT_DTYPE = "bfloat16"


def inference_dtype(requested: str = "auto", backend: str | None = None) -> str:
  """The compute dtype `--dtype` asks for: one of DTYPES, or "auto": that of `backend` (default: JAX's)."""
  if requested == "auto":
    return BACKEND_DTYPES.get(backend or jax.default_backend(), DEFAULT_DTYPE)
  if requested not in DTYPES:
    raise LlavaJaxError(f"inference dtype must be auto or one of {DTYPES}, got {requested!r}")
  return requested


def resolve_layout(layout: str | InferenceLayout | None) -> InferenceLayout:
  """An InferenceLayout from a name of LAYOUTS, an InferenceLayout, or None (this backend's)."""
  if layout is None:
    return layout_for()
  if isinstance(layout, InferenceLayout):
    return layout
  if layout not in LAYOUTS:
    raise LlavaJaxError(f"inference layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
  return LAYOUTS[layout]
