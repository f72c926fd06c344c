"""The device mesh and the ONE table that maps logical axis names onto it.

Parameters and key activations carry logical names (see models/layers.py); this module turns
them into NamedShardings on a `data` x `fsdp` x `tensor` mesh. Batches are split over
(data, fsdp); weights are split over fsdp (their `embed` dimension) and tensor (heads, mlp,
vocab), so FSDP and tensor parallelism come from the same rules.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llava_jax.errors import LlavaJaxError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (None = replicated). Flax assigns rules in order and never uses a
# mesh axis twice in one array, so activations (batch, length, embed) shard only the batch.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("layers", None),
    ("length", None),
)

# Inference: the few rows of a decode batch split over `data` only. `fsdp` stays a weight axis, so
# activations split their embed dimension over it instead and every device keeps its weight shard
# in place: matmuls reduce partial sums of (small) activations and never gather weights.
DECODE_RULES = (("batch", "data"),) + tuple(rule for rule in LOGICAL_RULES if rule[0] != "batch")


def mesh_shape(spec: Mapping[str, int], num_devices: int, label: str = "config: mesh") -> tuple[int, int, int]:
  """Resolves `mesh.data/fsdp/tensor` (one of them may be -1 = the remaining devices).

  `label` starts error messages (the config key, or the command-line flag that gave the spec).
  """
  sizes = [int(spec[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise LlavaJaxError(f"{label} {dict(zip(MESH_AXES, sizes))} must be positive sizes with at most one -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise LlavaJaxError(f"{label} {dict(zip(MESH_AXES, sizes))}: {num_devices} devices do not divide by {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise LlavaJaxError(
        f"{label} {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, {num_devices} are available")
  return tuple(sizes)


def make_mesh(spec: Mapping[str, int], devices=None, label: str = "config: mesh") -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(spec, len(devices), label)
  # jax.make_mesh defaults to Explicit axes; logical-axis sharding wants Auto (GSPMD propagation).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
  """`fsdp=2,tensor=4` (the config's mesh.data/fsdp/tensor as KEY=SIZE pairs) -> a mesh spec.

  Axes not named are 1; one axis may be -1 (the remaining devices), as in the config.
  """
  spec = dict.fromkeys(MESH_AXES, 1)
  named = set()
  for item in text.split(","):
    key, equals, value = (part.strip() for part in item.partition("="))
    if not equals or key not in MESH_AXES or key in named:
      raise LlavaJaxError(f"--mesh {text!r}: expected AXIS=SIZE[,AXIS=SIZE...] with each AXIS once, one of "
                          f"{', '.join(MESH_AXES)}; got {item!r}")
    try:
      spec[key] = int(value)
    except ValueError:
      raise LlavaJaxError(f"--mesh {text!r}: the size of {key} must be an integer, got {value!r}") from None
    named.add(key)
  return spec


def mesh_from_flag(text: str, devices=None) -> Mesh:
  """The mesh a `--mesh` flag asks for, over `devices` (default: all; one-line LlavaJaxError if it cannot be
  built)."""
  return make_mesh(parse_mesh(text), devices, label=f"--mesh {text!r}: mesh")


@contextlib.contextmanager
def active(mesh: Mesh, rules=LOGICAL_RULES):
  """Trace under this: the mesh, and the logical-axis rules that turn the model's activation
  annotations (batch/length/embed/mlp) into sharding constraints on it."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def axes_size(mesh, axes) -> int:
  """How many pieces a dimension split over `axes` (one entry of a PartitionSpec) has on `mesh`."""
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def logical_to_spec(names) -> P:
  return nn.logical_to_mesh_axes(names, LOGICAL_RULES)


def tree_shardings(boxed_abstract: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree whose leaves may be nn.Partitioned boxes (others are replicated).

  Raises a LlavaJaxError naming the parameter when a dimension does not divide its mesh axes.
  """
  specs = nn.get_partition_spec(boxed_abstract)
  shapes = nn.unbox(boxed_abstract)

  def one(path, spec, leaf):
    spec = logical_to_spec(tuple(spec))
    for dim, axes in zip(leaf.shape, spec):
      size = axes_size(mesh, axes)
      if dim % size:
        raise LlavaJaxError(
            f"sharding: {jax.tree_util.keystr(path, simple=True, separator='/')} has shape {tuple(leaf.shape)}; "
            f"dimension {dim} does not divide mesh axes {axes} of size {size} (change mesh.fsdp/mesh.tensor)")
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def place(tree: Any, shardings: Any) -> Any:
  """Host arrays (identical on every process) -> global arrays with these shardings.

  Each device receives only its own slice, so a tree larger than one device's memory fits.
  """
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), tree, shardings)


def batch_sharding(mesh: Mesh, rank: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (rank - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_devices(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
