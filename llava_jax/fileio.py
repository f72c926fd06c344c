"""Output folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

from llava_jax.errors import LlavaJaxError


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of `path` to write into; renames it to `path` on success.

  On any exception the temporary folder is removed, so a failed command leaves nothing behind.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise LlavaJaxError(f"{path}: output folder already exists")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(path):
    shutil.rmtree(path)
  os.rename(tmp, path)


def read_json(path: str | os.PathLike) -> dict:
  """A JSON object from a file; LlavaJaxError naming the file when it is missing or not one."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    raise LlavaJaxError(f"{os.fspath(path)}: no such file") from None
  except (OSError, UnicodeDecodeError) as e:
    raise LlavaJaxError(f"{os.fspath(path)}: cannot read ({e})") from None
  except json.JSONDecodeError as e:
    raise LlavaJaxError(f"{os.fspath(path)}: invalid JSON ({e})") from None
  if not isinstance(value, dict):
    raise LlavaJaxError(f"{os.fspath(path)}: expected a JSON object, got {type(value).__name__}")
  return value
