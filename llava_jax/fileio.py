"""Output folders and files that appear whole or not at all."""

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


_JSON_NAMES = {dict: "object", list: "array"}


def read_json(path: str | os.PathLike, expect: type = dict):
  """A JSON value of type `expect` (an object unless told) from a file; LlavaJaxError naming the file when
  it is missing or not one."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    raise LlavaJaxError(f"{os.fspath(path)}: no such file") from None
  except (OSError, UnicodeDecodeError) as e:
    raise LlavaJaxError(f"{os.fspath(path)}: cannot read ({e})") from None
  except json.JSONDecodeError as e:
    raise LlavaJaxError(f"{os.fspath(path)}: invalid JSON ({e})") from None
  if not isinstance(value, expect):
    raise LlavaJaxError(f"{os.fspath(path)}: expected a JSON {_JSON_NAMES.get(expect, expect.__name__)}, "
                        f"got {type(value).__name__}")
  return value


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary sibling of `path` to write; renames it to `path` on success (never half a file)."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(obj, path: str | os.PathLike) -> None:
  """`obj` as indented JSON at `path`, written to a temporary sibling and renamed: never half a file."""
  with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
