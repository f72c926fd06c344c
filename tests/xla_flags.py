"""XLA_FLAGS for the test processes: a fake CPU device count added to, or taken out of, whatever
flags the environment already holds (a user's other flags always survive)."""

import re

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def with_device_count(flags: str, count: int) -> str:
  """FLAGS with COUNT fake CPU devices, unless FLAGS already give a count (theirs wins)."""
  if _DEVICE_COUNT.search(flags):
    return flags
  return f"{flags} --xla_force_host_platform_device_count={count}".strip()


def without_device_count(flags: str) -> str:
  """FLAGS without a device count: one real CPU device, as a user's machine has."""
  return " ".join(_DEVICE_COUNT.sub("", flags).split())
