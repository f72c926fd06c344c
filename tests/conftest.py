"""Test-process environment, set before anything imports jax (subprocesses inherit it).

- 8 fake CPU devices, so sharding tests run in-process (added to any XLA_FLAGS already set).
- A persistent XLA compilation cache shared by the test processes and the CLI subprocesses they
  start: the same tiny-model programs are compiled once per machine instead of once per process.
- `kernel_calls`, a fixture shared by the attention and training tests.
"""

import os
import tempfile

import pytest

from xla_flags import with_device_count

os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), 8)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "llava_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `datasets` caches what it reads (lmms-lab exports in the eval tests) here, not in the user's ~/.cache.
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "llava_jax_test_datasets_cache"))


@pytest.fixture
def kernel_calls(monkeypatch):
  """How often each flash kernel of models/attention ran (traced), so a silent fallback to xla cannot pass for it."""
  from llava_jax.models import attention  # pylint: disable=import-outside-toplevel  (after XLA_FLAGS above)
  calls = {"cudnn": 0, "splash": 0}
  for name in calls:
    original = getattr(attention, f"{name}_attention")
    def counted(*args, name=name, original=original):
      calls[name] += 1
      return original(*args)
    monkeypatch.setattr(attention, f"{name}_attention", counted)
  return calls
