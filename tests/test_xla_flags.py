"""tests/conftest.py's XLA_FLAGS: the 8 fake CPU devices and optimization level 0 join flags already set in the
environment, and a device count or level already given there wins."""

import os
import subprocess
import sys

from xla_flags import with_device_count, with_fast_compile, without_device_count, without_fast_compile

TESTS = os.path.dirname(os.path.abspath(__file__))

# A fresh process that loads conftest (as pytest does, before jax), then compiles one program.
PROBE = """
import os
import conftest
import jax
jax.jit(lambda x: x + 1)(1.0).block_until_ready()
print(len(jax.devices("cpu")), os.environ["XLA_FLAGS"])
"""


def _probe(xla_flags, tmp_path):
  # An empty compilation cache: the program is compiled, not loaded.
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  proc = subprocess.run([sys.executable, "-c", PROBE], cwd=TESTS, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  devices, flags = proc.stdout.strip().splitlines()[-1].split(" ", 1)
  return int(devices), flags


def test_conftest_adds_8_devices_to_flags_already_set(tmp_path):
  dump = tmp_path / "dump"
  devices, flags = _probe(f"--xla_dump_to={dump}", tmp_path)
  assert devices == 8
  assert flags == f"--xla_dump_to={dump} --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
  assert dump.is_dir() and any(dump.iterdir())  # XLA got the other flag too: it dumped the program


def test_conftest_keeps_a_device_count_and_level_already_given(tmp_path):
  assert _probe("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=1", tmp_path) == (
      2, "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=1")


def test_without_device_count_leaves_the_other_flags():
  assert without_device_count(with_device_count("--xla_dump_to=/tmp/x", 8)) == "--xla_dump_to=/tmp/x"
  assert without_device_count("--xla_force_host_platform_device_count=8") == ""
  assert with_device_count("", 8) == "--xla_force_host_platform_device_count=8"
  assert with_fast_compile("--xla_dump_to=/tmp/x") == "--xla_dump_to=/tmp/x --xla_backend_optimization_level=0"
  assert without_fast_compile(with_fast_compile("--xla_dump_to=/tmp/x")) == "--xla_dump_to=/tmp/x"
