"""The `llava-jax train` command line: `--config FILE.py:ARGS --workdir DIR [--config.KEY=VALUE ...]`.

Parses the flags, joins the multi-host job when the environment describes one, and calls the
library (`loop.train`). Every process of a multi-host job runs the same command. Errors are
LlavaJaxError; `llava_jax.cli` turns them into one line and exit code 2.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from llava_jax.errors import LlavaJaxError


def run(argv: Sequence[str]) -> None:
  """`llava-jax train ARGV`."""
  from llava_jax.train import hosts, loop  # pylint: disable=import-outside-toplevel
  config, workdir = parse_flags(argv)
  hosts.initialize_distributed()
  loop.train(config, workdir)


def parse_flags(argv: Sequence[str]):
  """(config, workdir) from absl-style flags."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  define = lambda values: flags.DEFINE_string("workdir", None, "output folder (re-run the same command to resume)",
                                              flag_values=values)
  config, values = parse_config_flags("train", argv, define)
  if not values.workdir:
    raise LlavaJaxError("train: --workdir DIR is required")
  return config, values.workdir


def parse_config_flags(command: str, argv: Sequence[str], define: Callable[[Any], None]):
  """(config, flag values) of `llava-jax COMMAND --config FILE.py[:ARGS] [--config.KEY=V ...]` and the flags
  `define(values)` adds, parsed into a private FlagValues so the caller is re-entrant."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  values = flags.FlagValues()
  full_argv = [f"llava-jax {command}"] + list(argv)
  # sys_argv: the --config.KEY overrides are found in this list, not in the process's sys.argv.
  config_flags.DEFINE_config_file("config", None, f"{command} config: FILE.py[:ARGS]", flag_values=values,
                                  lock_config=True, sys_argv=full_argv)
  define(values)
  try:
    values(full_argv)
  except (flags.Error, ValueError, KeyError, AttributeError, TypeError, OSError) as e:
    missing = [a for a in e.args if isinstance(a, KeyError)] or ([e] if isinstance(e, KeyError) else [])
    if missing:  # config_flags: AttributeError(KeyError) for an override of a key the config lacks
      key = str(missing[0].args[0] if missing[0].args else "?").strip("'\"")
      raise LlavaJaxError(f"{command}: --config.{key}: no such config key") from None
    raise LlavaJaxError(f"{command}: {_last_error_line(e)}") from None
  if values["config"].value is None:
    raise LlavaJaxError(f"{command}: --config FILE.py:ARGS is required")
  try:
    config = values.config
    config.stage  # config_flags defers load errors to the first access
  except (OSError, ValueError, KeyError, AttributeError, TypeError, SyntaxError) as e:
    raise LlavaJaxError(f"{command}: --config {_argv_value(argv, '--config')}: {_last_error_line(e)}") from None
  return config, values


def _argv_value(argv: Sequence[str], name: str) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(name + "="):
      return arg.split("=", 1)[1]
    if arg == name and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _last_error_line(error: BaseException) -> str:
  """The innermost message: config_flags wraps the real cause in several multi-line layers."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__
