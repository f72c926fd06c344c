"""Output folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
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
