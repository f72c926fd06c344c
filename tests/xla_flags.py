"""XLA_FLAGS for the test processes: a fake CPU device count added to, or taken out of, whatever
flags the environment already holds (a user's other flags always survive), and LLVM's cheapest
optimization level for the compiled programs."""

import re

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")
_OPTIMIZATION_LEVEL = re.compile(r"--xla_backend_optimization_level=\S*")


def with_device_count(flags: str, count: int) -> str:
  """FLAGS with COUNT fake CPU devices, unless FLAGS already give a count (theirs wins)."""
  if _DEVICE_COUNT.search(flags):
    return flags
  return f"{flags} --xla_force_host_platform_device_count={count}".strip()


def without_device_count(flags: str) -> str:
  """FLAGS without a device count: one real CPU device, as a user's machine has."""
  return " ".join(_DEVICE_COUNT.sub("", flags).split())


def with_fast_compile(flags: str) -> str:
  """FLAGS with LLVM's optimization level 0, unless FLAGS already give a level (theirs wins). The tests' tiny
  programs spend most of their CPU time compiling (the tiny model's random init: 6 s at the default level, 2 s at
  0), little running. Results differ from the default level's in rounding only: tests compare runs made under
  the same flags bit for bit, and other implementations within tolerances."""
  if _OPTIMIZATION_LEVEL.search(flags):
    return flags
  return f"{flags} --xla_backend_optimization_level=0".strip()


def without_fast_compile(flags: str) -> str:
  """FLAGS at XLA's default optimization level: for runs whose steps, not their compiles, take the time."""
  return " ".join(_OPTIMIZATION_LEVEL.sub("", flags).split())
