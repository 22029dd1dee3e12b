import pathlib
import sys

# Tests import the project's packages (selfreg_jax, data_prep, configs) and the
# shared tiny configurations from the checkout, without installation.
ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / 'tests'):
  if str(path) not in sys.path:
    sys.path.insert(0, str(path))
