"""The package's shape: dependencies point one way (server -> engine -> models; eval -> engine; train -> models),
read from every import statement in the source, including imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import codegen2

ROOT = Path(codegen2.__file__).parent
# What each part may import from the package (the part itself always). Leaf modules: tokenizer, infill.
ALLOWED = {
    "models": {"models"},
    "kernels": {"kernels"},
    "tokenizer": set(),
    "infill": {"tokenizer"},
    "engine": {"engine", "models", "kernels", "tokenizer", "infill"},
    "server": {"server", "engine", "infill", "tokenizer"},
    "eval": {"eval", "engine", "infill", "tokenizer"},
    "train": {"train", "models", "tokenizer", "infill"},
    "__init__": set(),  # names the public API lazily, as strings
    "__main__": {"engine", "infill", "models", "server", "eval", "train", "kernels", "tokenizer"},
}


def part(module: str) -> str:
    """codegen2.engine.prompt -> engine; codegen2.tokenizer -> tokenizer; codegen2 -> __init__."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    """Every codegen2 module a file imports, absolute."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "codegen2"}
        elif isinstance(node, ast.ImportFrom) and node.module == "codegen2":  # from codegen2 import infill
            found |= {f"codegen2.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "codegen2":
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use absolute codegen2 imports")
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def test_dependencies_point_one_way():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 30
    wrong = []
    for path in files:
        me = module_name(path)
        mine = part(me) if me != "codegen2" else "__init__"
        for target in imports(path):
            theirs = part(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{me} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_only_the_command_line_imports_server_and_train():
    outside = []
    for path in sorted(ROOT.rglob("*.py")):
        me = module_name(path)
        for target in imports(path):
            if part(target) in ("server", "train") and part(me) not in (part(target), "__main__"):
                outside.append(f"{me} imports {target}")
    assert not outside, "\n".join(outside)


def test_the_rule_catches_a_model_reaching_into_the_engine(tmp_path):
    """The checker itself: an engine import in a model file is seen, also inside a function."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from codegen2.engine.runner import ModelRunner\n")
    assert imports(bad) == {"codegen2.engine.runner"}
    assert "engine" not in ALLOWED["models"]
