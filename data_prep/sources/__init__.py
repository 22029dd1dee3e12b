"""Source readers: one module per data set, loaded by name.

A source module turns one data set (a downloaded folder, or nothing for the
synthetic demo) into 2D examples and describes them:

  NAME: str                      # key in `SOURCE_MODULES`
  NUM_CLASSES: int               # including background
  IN_CHANNELS: int               # 1 for CT/MRI, 3 for RGB histology
  IMAGE_DTYPE: numpy dtype       # np.float32 (scaled) or np.uint8 (RGB)
  IS_VOLUMETRIC: bool            # cases are 3D volumes stored slice by slice
  SPLITS: tuple[str, ...]
  MANUAL_DOWNLOAD_INSTRUCTIONS: str   # '' when no source folder is needed
  def generate_examples(src, split, **options) -> Iterator[(key, example)]

with example = {'image': (H, W, IN_CHANNELS) IMAGE_DTYPE, 'label': (H, W)
uint8 in [0, NUM_CLASSES), 'case_id': str, 'slice_index': int,
'spacing': (3,) float32 (z, y, x) in mm}. Every option of `generate_examples`
is keyword-only or has a default.

Modules are imported only when asked for, so an unfinished reader does not
break the others.
"""

import importlib
import inspect
import json
import types
from typing import Any, Mapping

# Source name -> module implementing the contract above.
SOURCE_MODULES = {
    'demo': 'data_prep.demo',
    'synapse': 'data_prep.sources.synapse',
    'acdc': 'data_prep.sources.acdc',
    'glas': 'data_prep.sources.glas',
    'monuseg': 'data_prep.sources.monuseg',
}

_REQUIRED_ATTRIBUTES = ('NAME', 'NUM_CLASSES', 'IN_CHANNELS', 'IMAGE_DTYPE',
                        'IS_VOLUMETRIC', 'SPLITS',
                        'MANUAL_DOWNLOAD_INSTRUCTIONS', 'generate_examples')


def load_source(name: str) -> types.ModuleType:
  """Imports the source module called `name` and checks its contract."""
  if name not in SOURCE_MODULES:
    raise ValueError(
        f'Unknown data set {name!r}; valid names: {", ".join(SOURCE_MODULES)}.')
  module = importlib.import_module(SOURCE_MODULES[name])
  missing = [a for a in _REQUIRED_ATTRIBUTES if not hasattr(module, a)]
  if missing:
    raise ValueError(f'{module.__file__}: source module lacks {missing}.')
  if module.NAME != name:
    raise ValueError(
        f'{module.__file__}: NAME is {module.NAME!r}, expected {name!r}.')
  return module


def needs_source_folder(source: types.ModuleType) -> bool:
  """True when the data set is read from a downloaded folder."""
  return bool(source.MANUAL_DOWNLOAD_INSTRUCTIONS)


def resolve_options(source: types.ModuleType,
                    options: Mapping[str, Any]) -> dict[str, Any]:
  """Returns every build option of `source`: its defaults updated by `options`.

  The result is JSON-normalised (tuples become lists) so that it compares
  equal to the copy recorded in a built data set's metadata.

  Raises:
    ValueError: `options` names an option `source` does not take.
  """
  parameters = inspect.signature(source.generate_examples).parameters
  defaults = {
      name: p.default for name, p in list(parameters.items())[2:]
      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
  }
  unknown = sorted(set(options) - set(defaults))
  if unknown:
    raise ValueError(
        f'{source.__file__}: unknown build option(s) {unknown} for '
        f'{source.NAME!r}; valid options: {sorted(defaults) or "none"}.')
  resolved = {**defaults, **options}
  without_default = [
      k for k, v in resolved.items() if v is inspect.Parameter.empty]
  if without_default:
    raise ValueError(
        f'{source.__file__}: build option(s) {without_default} of '
        f'{source.NAME!r} have no default and were not given.')
  try:
    return json.loads(json.dumps(resolved))
  except TypeError as e:
    raise ValueError(f'Build options of {source.NAME!r} must be JSON values '
                     f'(numbers, strings, lists, dicts): {e}') from e
