"""Imports point down: data/ and models/ below eval/, teacher/ and train/; teacher/ never imports
train/ or serve; sharding.py never imports models/. Every import counts, function-level ones
included (a lazy import does not make an upward arrow go away)."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "sentijax"

# (modules under this path, sentijax modules they must not import)
RULES = (
    ("data", ("sentijax.train", "sentijax.eval", "sentijax.teacher", "sentijax.serve",
              "sentijax.models")),
    ("models", ("sentijax.train", "sentijax.eval", "sentijax.teacher", "sentijax.serve")),
    ("eval", ("sentijax.train", "sentijax.teacher", "sentijax.serve")),
    ("teacher", ("sentijax.train", "sentijax.serve")),
    ("serve.py", ("sentijax.train",)),
    ("serve_engine.py", ("sentijax.train",)),
    ("serve_events.py", ("sentijax.train",)),
    ("serve_requests.py", ("sentijax.train",)),
    ("serve_answers.py", ("sentijax.train",)),
    ("sharding.py", ("sentijax.models", "sentijax.train", "sentijax.eval")),
)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every import in the file, `from a import b` giving a.b and a."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.append((node.lineno, node.module))
      out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
  return out


def upward_imports(package: pathlib.Path) -> list[str]:
  found = []
  for where, banned in RULES:
    root = package / where
    for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
      for line, module in _imports(path):
        if any(module == b or module.startswith(b + ".") for b in banned):
          found.append(f"{path.relative_to(package.parent)}:{line} imports {module}")
  return sorted(set(found))


def test_no_module_imports_a_layer_above_it():
  assert upward_imports(PACKAGE) == []
