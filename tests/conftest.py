"""Test-process environment, set before anything imports jax (subprocesses inherit it).

- 8 fake CPU devices, so sharding tests run in-process (added to any XLA_FLAGS already set).
- LLVM optimization level 0: compiling, not running, is most of the tiny programs' time (xla_flags.py).
- A persistent XLA compilation cache shared by the test processes and the CLI subprocesses they
  start: the same tiny-model programs are compiled once per machine instead of once per process.
- The slowest files first: `make test` hands whole files to its 2 workers in collection order
  (--dist loadfile --no-loadscope-reorder), so neither is left running a long file alone at the end.
- `kernel_calls`, a fixture shared by the attention and training tests.
"""

import os
import tempfile

import pytest

from xla_flags import with_device_count, with_fast_compile

os.environ["XLA_FLAGS"] = with_fast_compile(with_device_count(os.environ.get("XLA_FLAGS", ""), 8))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "llava_jax_test_xla_cache"))
# The programs the default optimization level took over 0.5 s to compile (level 0 compiles them ~3x faster).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.15")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `datasets` caches what it reads (lmms-lab exports in the eval tests) here, not in the user's ~/.cache.
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "llava_jax_test_datasets_cache"))

# Most test time first (CPU seconds of each file alone, cold compilation cache); the other files follow in their
# usual order.
SLOWEST_FILES = ("test_demo.py", "test_train_next.py", "test_train_processes.py", "test_train_onevision.py",
                 "test_gpu_benchmark.py", "test_lora.py", "test_plan.py", "test_packing.py", "test_train_two_stage.py", "test_train_step.py",
                 "test_inference_layout.py", "test_generate_sharded.py", "test_generate_cli.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))  # stable: a file's tests keep their order


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
