"""The model benchmark runs end to end in its tiny mode and writes valid JSON."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_model_bench_smoke_writes_json(tmp_path):
  out = tmp_path / 'model_bench.json'
  run = subprocess.run(
      [sys.executable, '-m', 'benchmarks.model_bench', '--smoke',
       '--models', 'unet', '--out', str(out)], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'device cpu' in run.stdout
  results = json.loads(out.read_text())
  # The tiny UNet only: the tiny Swin's compiles would add two minutes.
  assert [r['model'] for r in results['results']] == ['unet']
  for result in results['results']:
    for key in ('forward_s', 'train_step_selfreg_s', 'train_step_baseline_s'):
      assert result[key] > 0
  assert not list(tmp_path.glob('*.tmp'))
