"""Short functions: none in pipeline/ or models/ is over 60 lines (the house rule of issue 11)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def long_functions(folder: Path, root: Path = ROOT) -> list[str]:
    """``path:line name (n lines)`` of every function or method over ``MAX_LINES`` lines under
    ``folder``, paths relative to ``root``."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_60_lines_in_pipeline_or_models():
    found = long_functions(ROOT / "pipeline") + long_functions(ROOT / "models")
    assert not found, "functions over 60 lines: " + ", ".join(found)


def test_the_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "long.py").write_text(f"def too_long():\n{body}\n")
    assert long_functions(tmp_path, tmp_path) == [f"long.py:1 too_long ({MAX_LINES + 1} lines)"]
