"""The import graph of `sft` has no cycles and flows one way, bottom to top:

    errors, console, config_keys -> tokenizer -> pipeline -> databuilder -> model -> config, hf -> config_check -> evaluator -> trainer -> serve, eval_job
    -> jobs -> cli, the `sft` package

Every import counts, function-level ones included, and importing `a.b.c` also runs the `__init__` of
`a.b` (unless the importer lives inside it), so a package whose `__init__` pulls in a module that
imports back is a cycle too.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

SFT = pathlib.Path(__file__).resolve().parent.parent / "sft"
LAYERS = [
    ("sft.errors", "sft.console", "sft.config_keys"),
    ("sft.tokenizer", "sft.annotator"),  # the annotator's interface and cache; its model backend is below
    ("sft.pipeline",),
    ("sft.databuilder",),
    ("sft.model",),
    ("sft.config", "sft.hf"),
    ("sft.config_check",),
    ("sft.evaluator",),
    ("sft.trainer",),
    ("sft.serve", "sft.eval_job", "sft.annotator.local", "sft.annotator.batches", "sft.audit"),
    ("sft.jobs",),
    ("sft.cli", "sft.__main__", "sft"),
]


def module_names(root: pathlib.Path = SFT) -> dict[str, pathlib.Path]:
  names = {}
  for path in root.rglob("*.py"):
    parts = path.relative_to(root.parent).with_suffix("").parts
    names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return names


def _ancestors(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
  """The project modules that importing `name` runs, directly."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  targets = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*anchor, *([base] if base else [])])
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        targets.add(sub if sub in modules else base)
  edges = set()
  for target in targets:
    if target.split(".")[0] != "sft":
      continue
    assert target in modules, f"{name} imports {target}, which does not exist"
    # Packages the importer lives in are already running; the others' __init__ runs now.
    edges |= {t for t in (*_ancestors(target), target) if t not in _ancestors(name) and t != name}
  return edges


def import_graph(root: pathlib.Path = SFT) -> dict[str, set[str]]:
  modules = module_names(root)
  return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def layer_of(name: str) -> int:
  best = None
  for rank, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if name == prefix or (prefix != "sft" and name.startswith(prefix + ".")):
        if best is None or len(prefix) > best[1]:
          best = (rank, len(prefix))
  assert best is not None, f"{name} is in no layer: add it to LAYERS"
  return best[0]


def test_the_import_graph_has_no_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_one_way():
  upward = [
      f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
      for a, targets in import_graph().items()
      for b in targets
      if layer_of(b) > layer_of(a)
  ]
  assert not upward, "\n".join(sorted(upward))


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_a_cycle_through_a_package_init_is_found(tmp_path):
  # trainer/__init__ imports trainer.loop -> serve -> trainer.setup: running trainer.setup first runs
  # trainer/__init__, which needs serve, which is still importing. No module-level edge closes it.
  root = tmp_path / "sft"
  for name, text in {
      "__init__.py": "",
      "trainer/__init__.py": "from sft.trainer.loop import train\n",
      "trainer/loop.py": "def train():\n  from sft import serve\n",
      "trainer/setup.py": "",
      "serve.py": "from sft.trainer import setup\n",
  }.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
  assert find_cycle(import_graph(root)) == ["sft.serve", "sft.trainer", "sft.trainer.loop", "sft.serve"]
  (root / "trainer/__init__.py").write_text("")
  assert find_cycle(import_graph(root)) is None


def test_no_module_imports_the_top_package():
  assert all("sft" not in targets for targets in import_graph().values())


@pytest.mark.parametrize("module", ["sft", "sft.databuilder", "sft.databuilder.stages"])
def test_light_modules_do_not_load_jax_at_import(module):
  # The data builder's worker processes import these: loading JAX there costs seconds per worker.
  code = f"import sys, {module}; assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))[:5]"
  result = subprocess.run([sys.executable, "-c", code], cwd=SFT.parent, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
