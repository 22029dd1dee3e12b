"""The package's floors (selfreg_jax/__init__.py): a module imports only from
its own floor or the floors above it in the docstring's list, so the import
graph has no back-arrows."""

import ast
import pathlib

import selfreg_jax

PACKAGE = pathlib.Path(selfreg_jax.__file__).parent
# Floors in import order: a module may import from floors with a smaller
# number (and its own), never from a larger one.
FLOORS = {'common': 0, 'core': 1, 'evaluation': 2, 'interop': 3, 'train': 4,
          'tools': 5}


def _floor(module: str) -> int:
  """Floor of a dotted module name below selfreg_jax."""
  return FLOORS[module.split('.')[0]]


def _imported(path: pathlib.Path) -> set[str]:
  """selfreg_jax modules a file imports, without the 'selfreg_jax.' prefix."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module.startswith('selfreg_jax')):
      base = node.module.removeprefix('selfreg_jax').lstrip('.')
      found.update(f'{base}.{a.name}'.lstrip('.') if not base else base
                   for a in node.names)
    elif isinstance(node, ast.Import):
      found.update(a.name.removeprefix('selfreg_jax.') for a in node.names
                   if a.name.startswith('selfreg_jax.'))
  return found


def test_every_module_sits_on_a_floor_and_imports_only_upwards():
  modules = [p for p in PACKAGE.rglob('*.py') if p.parent != PACKAGE
             or p.stem not in ('__init__',)]
  assert {p.relative_to(PACKAGE).parts[0].removesuffix('.py')
          for p in modules} == set(FLOORS)
  upward = []
  for path in modules:
    module = '.'.join(path.relative_to(PACKAGE).with_suffix('').parts)
    for imported in _imported(path):
      if _floor(imported) > _floor(module):
        upward.append(f'{module} imports {imported}')
  assert not upward
