"""The entry points end a user's mistake with one line, `error: ...`, status 2.

Each probe runs an entry point in a subprocess on a bad input that must be
refused before anything is compiled or written. The probes start together
(the entry points spend their time importing) and each test checks one.
"""

import argparse
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from selfreg_jax.common import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBE_TIMEOUT_S = 600
# Probe name -> (arguments of `python`, the one line it must print on stderr),
# both formatted with {tmp}: the probes' own temporary folder. Nothing may
# appear under {tmp}/out. A probe with data_dir {tmp}/data meets its mistake
# where the demo data is not built yet: it must be told before any building.
PROBES = {
    'main_unknown_key': (
        ['main.py', '--config=configs/demo.py', '--workdir={tmp}/out',
         '--config.batch_szie=4'],
        "error: unknown config key 'batch_szie' (did you mean 'batch_size'?)"),
    'main_bad_value': (
        ['main.py', '--config=configs/demo.py', '--workdir={tmp}/out',
         '--config.optimizer.learning_rate=inf',
         '--config.dataset.data_dir={tmp}/data'],  # as if never built
        'error: config.optimizer.learning_rate=inf must be a finite number.'),
    'sweep_unknown_grid_key': (
        ['-m', 'selfreg_jax.tools.sweep', '--config=configs/demo.py',
         '--workdir={tmp}/out', '--grid=loss.scr_weigt=0,0.01',
         '--print-commands'],
        "error: unknown config key 'loss.scr_weigt' (did you mean "
        "'loss.scr_weight'?)"),
    'convert_unknown_key': (
        ['-m', 'selfreg_jax.interop.convert', '--from-torch={tmp}/trained.pth',
         '--config=configs/demo.py', '--out={tmp}/out',
         '--config.model.nme=unet'],
        "error: unknown config key 'model.nme' (did you mean 'model.name'?)"),
    'analysis_without_checkpoint': (
        ['-m', 'selfreg_jax.tools.analysis', '--config=configs/demo.py',
         '--workdir={tmp}/out', '--case=test_000',
         '--config.dataset.data_dir={tmp}/data'],
        'error: No checkpoint in {tmp}/out/checkpoints: train first or '
        'convert a PyTorch checkpoint into it.'),
    'report_without_runs': (
        ['-m', 'selfreg_jax.tools.report', '{tmp}/out'],
        'error: {tmp}/out: no such folder.'),
    'build_from_empty_folder': (
        ['-m', 'data_prep.build', 'synapse', '--src={tmp}/empty',
         '--out={tmp}/out'],
        "error: {tmp}/empty: source folder of 'synapse' is empty; the download "
        'instructions are printed above.'),
}


@pytest.fixture(scope='module')
def probe_results(tmp_path_factory):
  """Probe name -> (completed process, its temporary folder)."""
  root = tmp_path_factory.mktemp('cli_probes')
  # main.py's restart with huge pages is not under test here.
  env = dict(os.environ, JAX_PLATFORMS='cpu', GLIBC_TUNABLES='')
  started = {}
  for name, (args, _) in PROBES.items():
    tmp = root / name
    (tmp / 'empty').mkdir(parents=True)
    started[name] = (tmp, subprocess.Popen(
        [sys.executable, *(arg.format(tmp=tmp) for arg in args)], cwd=ROOT,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = {}
  for name, (tmp, process) in started.items():
    stdout, stderr = process.communicate(timeout=PROBE_TIMEOUT_S)
    results[name] = (subprocess.CompletedProcess(
        process.args, process.returncode, stdout, stderr), tmp)
  return results


@pytest.mark.parametrize('name', PROBES)
def test_user_mistake_gives_one_error_line_and_status_2(probe_results, name):
  result, tmp = probe_results[name]
  assert result.returncode == cli.EXIT_USER_ERROR, result.stderr[-3000:]
  assert result.stderr.splitlines() == [PROBES[name][1].format(tmp=tmp)]
  assert not (tmp / 'out').exists()
  assert not (tmp / 'data').exists()


@pytest.mark.parametrize('key,message', [
    ('loss.ce_weigth', "unknown config key 'loss.ce_weigth' (did you mean "
                       "'loss.ce_weight'?)"),
    ('lsos.ce_weight', "unknown config key 'lsos.ce_weight' (did you mean "
                       "'loss.ce_weight'?)"),
    ('loss.xyz', "unknown config key 'loss.xyz'"),
    ('batch_size.x', "unknown config key 'batch_size.x'"),
])
def test_unknown_config_keys_are_named_with_the_closest_key(key, message):
  config = ml_collections.ConfigDict(
      {'batch_size': 4, 'loss': {'ce_weight': 0.4, 'dice_weight': 0.6}})
  cli.check_config_key(config, 'loss.ce_weight')
  with pytest.raises(cli.UserError) as error:
    cli.check_config_key(config, key)
  assert str(error.value) == message


@pytest.mark.parametrize('error', [cli.UserError('bad value'),
                                   FileNotFoundError('x.pth: not found')])
def test_run_turns_user_errors_into_one_line(error, capsys):
  def main():
    raise error
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main)
  assert exit_info.value.code == cli.EXIT_USER_ERROR
  assert capsys.readouterr().err == f'error: {error}\n'


def test_run_leaves_bugs_their_traceback_and_passes_the_status():
  def bug():
    raise KeyError('a bug')
  with pytest.raises(KeyError):
    cli.run(bug)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(lambda status: status, 3)
  assert exit_info.value.code == 3


def test_argument_parser_errors_are_user_errors():
  parser = cli.ArgumentParser(prog='tool')
  parser.add_argument('name', choices=['a', 'b'])
  with pytest.raises(cli.UserError, match="invalid choice: 'c'"):
    parser.parse_args(['c'])
  with pytest.raises(cli.UserError, match='required: name'):
    parser.parse_args([])
  assert isinstance(parser.parse_args(['a']), argparse.Namespace)
