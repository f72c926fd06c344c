"""Byte sizes written by people (`80GB`, `16GiB`, `500MB`) -> bytes."""

from __future__ import annotations

import math

from llava_jax.errors import LlavaJaxError

UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str, flag: str) -> int:
  """A positive size like 80GB, 16GiB, 500MB or a plain number of bytes; `flag` names it in errors."""
  upper = text.strip().upper()
  for unit in sorted(UNITS, key=len, reverse=True):
    if upper.endswith(unit):
      number, scale = upper[:-len(unit)], UNITS[unit]
      break
  else:
    number, scale = upper, 1
  try:
    value = float(number) * scale
  except ValueError:
    value = math.nan
  if not (math.isfinite(value) and value >= 1):
    raise LlavaJaxError(f"{flag}: expected a size like 80GB, 16GiB or 500MB, got {text!r}")
  return int(value)
