"""The import graph of ``jaxprune/``, ``train/`` and ``benchmarks/``: no cycle, and layers that
only import downwards.

The graph is built from the source with :mod:`ast` (nothing is imported): one node per module
(a package is its ``__init__``), one edge per import statement anywhere in a module (inside
functions too: an import deferred to call time is still a dependency), with relative imports
resolved against the module's package. ``import a.b.c`` and ``from a.b import c`` are edges to
the deepest module they name (``a.b.c`` when it is a module, else ``a.b``); names that are not
modules (functions, classes) resolve to the module they are imported from.

Edges from a module to its *own ancestor packages* are left out. Python initialises a
package's ``__init__`` before any of its submodules, so ``from jaxprune import _tree`` inside
``jaxprune/masks.py`` adds no dependency beyond ``jaxprune._tree`` (recorded as its own edge),
and together with the ``__init__``'s own re-exports (``jaxprune/__init__`` imports
``jaxprune.masks``) it would make every package a cycle. Edges from a package's ``__init__``
to its submodules are kept: importing the package runs them, so a cycle through a subpackage's
``__init__`` (``transforms`` -> ``analysis/__init__`` -> ``analysis.groups`` -> ``transforms``)
is a real one and is reported. Imports under ``if TYPE_CHECKING:`` are left out: they are
read by type checkers only and never run.

Rules checked:

* no cycle among these modules;
* ``jaxprune`` never imports ``train`` or ``benchmarks`` (the library sits below the runner and
  the benchmarks), and ``train`` never imports ``benchmarks`` (the runner works without the
  benchmarks; only ``jaxprune`` is installed, see ``pyproject.toml``);
* no module of ``train`` or ``benchmarks`` uses a private function or class of another module
  (``from m import _f`` or ``m._f``); private *modules* such as ``jaxprune._tree`` are allowed.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("jaxprune", "train", "benchmarks")


def find_modules(root: pathlib.Path, packages=PACKAGES) -> dict[str, pathlib.Path]:
  """``{dotted module name: file}`` for every ``.py`` file under the packages."""
  modules = {}
  for package in packages:
    for path in sorted((root / package).rglob("*.py")):
      parts = list(path.relative_to(root).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts.pop()
      modules[".".join(parts)] = path
  return modules


def _is_package(name: str, modules: dict[str, pathlib.Path]) -> bool:
  return modules[name].name == "__init__.py"


def _deepest(name: str, modules) -> str | None:
  """The longest prefix of the dotted ``name`` that is one of ``modules``."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    candidate = ".".join(parts[:n])
    if candidate in modules:
      return candidate
  return None


def _is_type_checking(node: ast.AST) -> bool:
  """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
  if not isinstance(node, ast.If):
    return False
  test = node.test
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, modules) -> list[tuple[str, str | None, int]]:
  """``(imported module, imported name or None, line)`` of every import in ``tree``."""
  package = module if _is_package(module, modules) else module.rpartition(".")[0]
  out = []
  type_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block)
               for stmt in block.body for n in ast.walk(stmt)}
  for node in ast.walk(tree):
    if id(node) in type_only:
      continue
    if isinstance(node, ast.Import):
      out += [(alias.name, None, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      out += [(source, alias.name, node.lineno) for alias in node.names]
  return out


def import_graph(root: pathlib.Path = ROOT, packages=PACKAGES):
  """``(modules, edges, trees)``: ``edges[m]`` maps each module ``m`` imports to a line."""
  modules = find_modules(root, packages)
  edges: dict[str, dict[str, int]] = {m: {} for m in modules}
  trees = {}
  for module, path in modules.items():
    trees[module] = tree = ast.parse(path.read_text(), filename=str(path))
    ancestors = {".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 1)}
    if not _is_package(module, modules):
      ancestors.add(module.rpartition(".")[0])
    for source, name, line in _imports(tree, module, modules):
      full = f"{source}.{name}" if name and name != "*" else source
      target = _deepest(full, modules)
      if target is None or target == module or target in ancestors:
        continue
      edges[module].setdefault(target, line)
  return modules, edges, trees


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
  """One cycle ``[a, b, ..., a]`` of the graph, or None (iterative depth-first search)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  for start in sorted(edges):
    if state.get(start):
      continue
    path, stack = [start], [iter(sorted(edges[start]))]
    state[start] = 1
    while stack:
      nxt = next(stack[-1], None)
      if nxt is None:
        state[path.pop()] = 2
        stack.pop()
      elif state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      elif not state.get(nxt):
        state[nxt] = 1
        path.append(nxt)
        stack.append(iter(sorted(edges.get(nxt, ()))))
  return None


GRAPH = import_graph()


def test_the_graph_sees_every_module_and_known_edges():
  modules, edges, _ = GRAPH
  assert {"jaxprune", "jaxprune._tree", "jaxprune.analysis", "train.analyze", "train.runs",
          "train.configs.mitigation", "benchmarks.fairness"} <= set(modules)
  assert "train.runs" in edges["train.analyze"] and "train.train" in edges["benchmarks.fairness"]
  assert "jaxprune._tree" in edges["train.runs"]       # from jaxprune import _tree
  assert "jaxprune.analysis" in edges["jaxprune"]      # a package's __init__ edges are kept
  assert "jaxprune" not in edges["jaxprune.masks"]     # own ancestors are not


def test_no_import_cycle():
  cycle = find_cycle(GRAPH[1])
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("lower, upper", [("jaxprune", "train"), ("jaxprune", "benchmarks"),
                                          ("train", "benchmarks")])
def test_layers_import_downwards_only(lower, upper):
  _, edges, _ = GRAPH
  bad = [f"{m} -> {t} (line {line})" for m, targets in edges.items()
         if m.split(".")[0] == lower for t, line in targets.items()
         if t.split(".")[0] == upper]
  assert not bad, f"{lower} must not import {upper}: {bad}"


def _private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def test_train_and_benchmarks_use_no_private_function_of_another_module():
  modules, _, trees = GRAPH
  bad = []
  for module, tree in trees.items():
    if module.split(".")[0] not in ("train", "benchmarks"):
      continue
    aliases = {}  # local name -> module it is bound to
    for source, name, line in _imports(tree, module, modules):
      full = f"{source}.{name}" if name else source
      if name is None:
        continue
      if full in modules:
        aliases[name] = full
      elif source in modules and _private(name):
        bad.append(f"{module}:{line} imports {source}.{name}")
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name in modules:
            aliases[alias.asname or alias.name.split(".")[0]] = (
                alias.name if alias.asname else alias.name.split(".")[0])
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and _private(node.attr)
          and isinstance(node.value, ast.Name) and node.value.id in aliases):
        owner = aliases[node.value.id]
        if owner != module and f"{owner}.{node.attr}" not in modules:
          bad.append(f"{module}:{node.lineno} uses {owner}.{node.attr}")
  assert not bad, bad


def test_cycle_finder_and_resolver_on_a_synthetic_tree(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  files = {"__init__.py": "from pkg import a\nfrom . import b\n",
           "a.py": "from pkg import _helpers\n",
           "_helpers.py": "def f():\n  from .sub import c\n",
           "b.py": "import pkg.a\n",
           "sub/__init__.py": "",
           "sub/c.py": "import os\nfrom ..sub import d\n",
           "sub/d.py": "from pkg import sub\n"}
  for name, text in files.items():
    (pkg / name).write_text(text)
  modules, edges, _ = import_graph(tmp_path, ("pkg",))
  assert set(modules) == {"pkg", "pkg.a", "pkg._helpers", "pkg.b", "pkg.sub", "pkg.sub.c",
                          "pkg.sub.d"}
  assert edges == {"pkg": {"pkg.a": 1, "pkg.b": 2}, "pkg.a": {"pkg._helpers": 1},
                   "pkg._helpers": {"pkg.sub.c": 2}, "pkg.b": {"pkg.a": 1}, "pkg.sub": {},
                   "pkg.sub.c": {"pkg.sub.d": 2}, "pkg.sub.d": {}}
  assert find_cycle(edges) is None
  # d imports a, which (through _helpers, at call time) imports c, which imports d.
  (pkg / "sub" / "d.py").write_text("from ..a import thing\n")
  cycle = find_cycle(import_graph(tmp_path, ("pkg",))[1])
  assert cycle == ["pkg.a", "pkg._helpers", "pkg.sub.c", "pkg.sub.d", "pkg.a"]
