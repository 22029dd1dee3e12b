"""Source readers: one module per data set, loaded by name.

A source module turns one data set (a downloaded folder, or nothing for the
synthetic demo) into 2D examples and describes them:

  NAME: str                      # key in `SOURCE_MODULES`
  NUM_CLASSES: int               # including background
  IN_CHANNELS: int               # 1 for CT/MRI, 3 for RGB histology
  IMAGE_DTYPE: numpy dtype       # np.float32 (scaled) or np.uint8 (RGB)
  IS_VOLUMETRIC: bool            # cases are 3D volumes stored slice by slice
  SPLITS: tuple[str, ...]        # ('train', 'validation', 'test')
  LAYOUTS: dict[str, str]        # accepted layouts: name -> what it holds
  MANUAL_DOWNLOAD_INSTRUCTIONS: str   # '' when no source folder is needed
  def plan_build(src, options) -> BuildPlan
  def generate_examples(src, split, **options) -> Iterator[(key, example)]

with example = {'image': (H, W, IN_CHANNELS) IMAGE_DTYPE, 'label': (H, W)
uint8 in [0, NUM_CLASSES), 'case_id': str, 'slice_index': int,
'spacing': (3,) float32 (z, y, x) in mm}. Every option of `generate_examples`
is keyword-only or has a default, and is described in its docstring's Args
(the build CLI's per-data-set help shows them). `plan_build` gets the source
folder (None when none is needed) and every option (defaults included), and
says which layout the folder holds, which splits the build writes and which
options it leaves unused (`BuildPlan`).

Modules are imported only when asked for, so an unfinished reader does not
break the others.
"""

import dataclasses
import importlib
import inspect
import json
import re
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
                        'IS_VOLUMETRIC', 'SPLITS', 'LAYOUTS',
                        'MANUAL_DOWNLOAD_INSTRUCTIONS', 'plan_build',
                        'generate_examples')
# Parameters of `generate_examples` that are not build options.
_NON_OPTIONS = 2  # src, split
# An entry of a Google-style Args section: 'name: text' or 'a, b: text'.
_ARG_ENTRY = re.compile(r'^  (\w+(?:, \w+)*): (.*)$')


@dataclasses.dataclass(frozen=True)
class BuildPlan:
  """What building a source from one folder with given options does.

  Attributes:
    layout: the layout found in the source folder (a key of the source's
      LAYOUTS).
    splits: the splits the build writes, in SPLITS order. 'validation' is left
      out when nothing is held out for it (e.g. val_cases=0), so the built set
      has no such split rather than an empty one.
    unused: the options this build does not apply -> why not (one clause). A
      build refuses them when given and does not record them.
  """
  layout: str
  splits: tuple[str, ...]
  unused: Mapping[str, str] = dataclasses.field(default_factory=dict)


def splits_with(validation: bool) -> tuple[str, ...]:
  """The splits a build writes: train, validation (if `validation`), test."""
  return ('train', 'validation', 'test') if validation else ('train', 'test')


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


def option_defaults(source: types.ModuleType) -> dict[str, Any]:
  """Build option of `source` -> its default (inspect.Parameter.empty if
  none), in the order of `generate_examples`' signature."""
  parameters = inspect.signature(source.generate_examples).parameters
  return {
      name: p.default for name, p in list(parameters.items())[_NON_OPTIONS:]
      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
  }


def option_descriptions(source: types.ModuleType) -> dict[str, str]:
  """Build option of `source` -> its description in the Args section of
  `generate_examples`' docstring (continuation lines joined)."""
  descriptions, names, in_args = {}, (), False
  for line in (inspect.getdoc(source.generate_examples) or '').splitlines():
    if not line.startswith(' '):
      in_args = line == 'Args:'
      continue
    entry = _ARG_ENTRY.match(line)
    if in_args and entry:
      names = entry.group(1).split(', ')
      for name in names:
        descriptions[name] = entry.group(2)
    elif in_args and line.startswith('    '):
      for name in names:
        descriptions[name] += ' ' + line.strip()
  defaults = option_defaults(source)
  return {name: descriptions.get(name, '') for name in defaults}


def resolve_options(source: types.ModuleType,
                    options: Mapping[str, Any]) -> dict[str, Any]:
  """Returns every build option of `source`: its defaults updated by `options`.

  The result is JSON-normalised (tuples become lists) so that it compares
  equal to the copy recorded in a built data set's metadata.

  Raises:
    ValueError: `options` names an option `source` does not take.
  """
  defaults = option_defaults(source)
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


def plan_build(source: types.ModuleType, src, options: Mapping[str, Any]
               ) -> tuple[BuildPlan, dict[str, Any]]:
  """Plans building `source` from folder `src` with the given `options`.

  Args:
    source: a source module.
    src: its source folder (checked to exist and hold something), or None
      for a source that needs none.
    options: the options the user gave; the others take their defaults.

  Returns:
    (the source's plan, the options the build applies, given or default,
    JSON-normalised as `resolve_options` returns them).

  Raises:
    ValueError: an unknown option, a given option that this build does not
      apply (the message names it and says why), or a bad option value.
    FileNotFoundError: `src` holds none of the source's layouts.
  """
  resolved = resolve_options(source, options)
  plan = source.plan_build(src, resolved)
  refused = [name for name in options if name in plan.unused]
  if refused:
    if len(refused) == 1:
      refusal = f'{refused[0]!r} does not apply'
      reasons = plan.unused[refused[0]]
    else:
      refusal = f'{", ".join(map(repr, refused))} do not apply'
      reasons = '; '.join(f'{name}: {plan.unused[name]}' for name in refused)
    raise ValueError(
        f'{src or source.NAME}: build option {refusal} to this {source.NAME} '
        f'build (layout: {plan.layout}): {reasons}.')
  return plan, {k: v for k, v in resolved.items() if k not in plan.unused}
