"""Raw records every machine has: the public API of the Python standard library.

The source files are parsed with `ast`, never imported, so reading them runs no module code (no
`antigravity` opening a browser, no platform-specific import errors) and gives the same records on
every machine with the same Python version.
"""

from __future__ import annotations

import ast
import collections
import copy
import dataclasses
import pathlib
import sysconfig

# Folders of the standard library that hold tests, tools or vendored packages, not its API.
_SKIPPED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "Tools"})


@dataclasses.dataclass(frozen=True)
class ApiDoc:
  module: str  # "json"
  qualname: str  # "dumps" or "JSONEncoder.encode"
  kind: str  # "function", "class" or "method"
  signature: str  # "(obj, *, skipkeys=False)", without self/cls
  docstring: str  # cleaned with inspect.cleandoc; "" when there is none

  @property
  def name(self) -> str:
    return f"{self.module}.{self.qualname}"


def stdlib_dir() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  """`json/__init__.py` -> `json`; `email/mime/text.py` -> `email.mime.text`."""
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def is_public_module(name: str) -> bool:
  return bool(name) and not any(part.startswith("_") for part in name.split("."))


def _signature(args: ast.arguments, drop_first: bool) -> str:
  """`(self, a, b=1)` -> `(a, b=1)` when `drop_first` (methods lose self/cls)."""
  args = copy.copy(args)  # shallow: the lists below are rebuilt, never edited in place
  if drop_first and args.posonlyargs:
    args.posonlyargs = args.posonlyargs[1:]
  elif drop_first and args.args:
    # Defaults belong to the last positional parameters; the first has one only if all do.
    if len(args.defaults) == len(args.args):
      args.defaults = args.defaults[1:]
    args.args = args.args[1:]
  return f"({ast.unparse(args)})"


def _is_public(name: str) -> bool:
  return not name.startswith("_")


def read_module(source: str | bytes, module: str) -> list[ApiDoc]:
  """The public functions, classes and methods defined at the top of one module's source.

  >>> [d.name for d in read_module("def f(a, b=1):\\n  'Add.'\\nclass C:\\n  def m(self, x): pass", "m")]
  ['m.f', 'm.C', 'm.C.m']
  """
  tree = ast.parse(source)
  docs = []
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_public(node.name):
      docs.append(ApiDoc(module, node.name, "function", _signature(node.args, False), ast.get_docstring(node) or ""))
    elif isinstance(node, ast.ClassDef) and _is_public(node.name):
      init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
      signature = _signature(init.args, True) if init else "()"
      docs.append(ApiDoc(module, node.name, "class", signature, ast.get_docstring(node) or ""))
      for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_public(item.name):
          is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in item.decorator_list)
          docs.append(
              ApiDoc(
                  module,
                  f"{node.name}.{item.name}",
                  "method",
                  _signature(item.args, not is_static),
                  ast.get_docstring(item) or "",
              )
          )
  return docs


def read_stdlib(root: pathlib.Path | None = None) -> tuple[list[ApiDoc], dict[str, int]]:
  """Every public ApiDoc under `root` (the running Python's stdlib by default), and counts of what
  was read and what was skipped, by reason."""
  root = root or stdlib_dir()
  stats: collections.Counter[str] = collections.Counter()
  docs: list[ApiDoc] = []
  for path in sorted(root.rglob("*.py")):
    rel_parts = path.relative_to(root).parts
    if _SKIPPED_PARTS.intersection(rel_parts):
      continue
    stats["files_seen"] += 1
    name = module_name(path, root)
    if not is_public_module(name):
      stats["files_skipped_private_module"] += 1
      continue
    try:
      module_docs = read_module(path.read_bytes(), name)
    except (SyntaxError, ValueError, UnicodeDecodeError) as err:  # e.g. lib2to3 test data with Python 2 syntax
      stats[f"files_skipped_unparsable_{type(err).__name__}"] += 1
      continue
    stats["files_read"] += 1
    docs.extend(module_docs)
  stats["api_docs"] = len(docs)
  return docs, dict(stats)
