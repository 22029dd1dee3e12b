"""What the command-line entry points share: one line for a user's mistake,
and a readable console.

A mistake in what the user gave (a flag, a config key or value, a file or
folder) ends the program with one line on stderr, `error: MESSAGE`, and exit
status 2, as argparse does; tracebacks are left for bugs. The entry points
(main.py, data_prep.build, selfreg_jax.interop.convert, .analysis, .sweep and
.report) run their `main` through `run` (argparse) or `run_app` (absl flags).

User errors are `UserError` (raised for bad input; configuration.ConfigError
is one), FileNotFoundError (a missing input), absl's flag errors and
app.UsageError.
"""

import argparse
import contextlib
import difflib
import functools
import logging as std_logging
import sys
from typing import Any, Callable, Iterator, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

EXIT_USER_ERROR = 2
# The config-file flag of the absl entry points (`--config`, `--config.KEY=V`).
CONFIG_FLAG = 'config'


class UserError(ValueError):
  """Bad input from the user; the message (one line) names it and says what
  is wrong."""


USER_ERRORS = (UserError, FileNotFoundError, flags.Error, app.UsageError)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
  """Ends the program with `error: MESSAGE` and status 2 on a user error."""
  try:
    yield
  except USER_ERRORS as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def config_overrides() -> frozenset[str]:
  """Dotted keys of the command line's `--config.KEY=V` overrides (none
  before the flags are parsed or without a config flag)."""
  if CONFIG_FLAG not in flags.FLAGS or not flags.FLAGS.is_parsed():
    return frozenset()
  return frozenset(config_flags.get_override_values(flags.FLAGS[CONFIG_FLAG]))


def run(main: Callable[..., int | None], *args: Any) -> NoReturn:
  """Exits with the status `main(*args)` returns (None: 0), or with one line
  and status 2 on a user error."""
  with exit_on_user_error():
    status = main(*args)
  sys.exit(status)


class QuietLibraries(std_logging.Filter):
  """Keeps the console readable: INFO lines from this project and CLU's
  progress reports, warnings and errors from everything but orbax. Orbax's
  failures come back as exceptions, which selfreg_jax.core.checkpoints reports in
  one line (orbax also logs each one, traceback and all, from every thread
  it passes through). Run with --verbosity=1 to see every library's
  records."""

  SHOWN_INFO = ('/selfreg_jax/', '/data_prep/', 'main.py', '/clu/platform/',
                '/clu/periodic_actions')

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return '/orbax/' not in record.pathname
    return any(part in record.pathname for part in self.SHOWN_INFO)


def run_app(main: Callable[[list[str]], int | None]) -> NoReturn:
  """absl's `app.run(main)`, with user errors in the flags or in `main` as one
  line and status 2, and other libraries' INFO logs hidden (QuietLibraries)
  unless --verbosity >= 1."""
  app.run(functools.partial(_run_quietly, main), flags_parser=_parse_flags)


def _run_quietly(main: Callable[[list[str]], int | None],
                 argv: list[str]) -> NoReturn:
  if flags.FLAGS.verbosity <= 0:
    logging.get_absl_handler().addFilter(QuietLibraries())
  run(main, argv)


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser whose usage errors are UserErrors (one line under
  `run`, without the usage text)."""

  def error(self, message: str) -> NoReturn:
    raise UserError(message)


def check_config_key(config: ml_collections.ConfigDict, key: str) -> None:
  """Raises UserError if the dotted `key` names no field of `config`.

  The message suggests the closest existing key (each unknown part replaced
  by its closest sibling), when every unknown part has one.
  """
  node, closest, known = config, [], True
  for part in key.split('.'):
    fields = (list(node.keys()) if isinstance(node, ml_collections.ConfigDict)
              else [])
    if part not in fields:
      known = False
      matches = difflib.get_close_matches(part, fields, n=1)
      if not matches:
        raise UserError(f'unknown config key {key!r}')
      part = matches[0]
    closest.append(part)
    node = node[part]
  if not known:
    raise UserError(f'unknown config key {key!r} (did you mean '
                    f'{".".join(closest)!r}?)')


def _config_arguments(argv: Sequence[str]) -> tuple[str | None, list[str]]:
  """The `--config` file argument and the `--config.KEY` override keys."""
  args = iter(flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False))
  config_file, keys = None, []
  for arg in args:
    if arg == '--':
      break
    if not arg.startswith('-'):
      continue
    name, has_value, value = arg.lstrip('-').partition('=')
    if name == CONFIG_FLAG:
      config_file = value if has_value else next(args, None)
    elif name.startswith((f'{CONFIG_FLAG}.', f'no{CONFIG_FLAG}.')):
      keys.append(name.partition('.')[2])
  return config_file, keys


def _check_config_overrides(argv: Sequence[str]) -> None:
  """Raises UserError for the first `--config.KEY` override in `argv` whose
  KEY names no field of the config file's config."""
  config_file, keys = _config_arguments(argv)
  if CONFIG_FLAG in flags.FLAGS and config_file is not None:
    config = flags.FLAGS[CONFIG_FLAG].parser.parse(config_file)
    for key in keys:
      check_config_key(config, key)


def _check_config_loaded() -> None:
  """Raises UserError if the config file could not be loaded.

  ml_collections keeps the loading error (e.g. no such file) until the config
  is first used.
  """
  if CONFIG_FLAG not in flags.FLAGS:
    return
  config = flags.FLAGS[CONFIG_FLAG].value
  try:
    if config is not None:
      config.keys()
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    raise UserError(f'--{CONFIG_FLAG}: cannot load the config file '
                    f'({reason})') from e


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; user errors end the program with one line.

  ml_collections' config flag fails with a KeyError or AttributeError (a
  chain of three tracebacks) on an override `--config.KEY=V` whose KEY names
  no field; that becomes a UserError naming KEY.
  """
  with exit_on_user_error():
    try:
      args = flags.FLAGS(argv)
    except (KeyError, AttributeError):
      _check_config_overrides(argv)
      raise
    _check_config_loaded()
    return args
