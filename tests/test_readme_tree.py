"""The README's "Where things are" table matches the tree: every module of pipeline/, models/,
jobs/ and bench/ is named in it, and every path it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_rows() -> list[tuple[str, str]]:
    """(path cell, description cell) of each row of the README's "Where things are" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            rows.append((cells[0], cells[1]))
    return rows


def named_files() -> set[Path]:
    """Every file the table names, resolved against the folder its row is about."""
    names: set[Path] = set()
    for path_cell, description in table_rows():
        for raw in re.findall(r"`([^`]+)`", path_cell):
            if raw.endswith("/"):  # a folder row: its description names files inside it
                names.add(ROOT / raw)
                for name in re.findall(r"`([\w/]+\.py)`", description):
                    names.add(ROOT / raw / name)
            else:
                braces = re.fullmatch(r"(.*)\{(.+)\}(.*)", raw)
                parts = ([braces[1] + p + braces[3] for p in braces[2].split(",")] if braces else [raw])
                names.update(ROOT / p for p in parts)
    return names


def test_every_path_in_the_table_exists():
    missing = sorted(str(p.relative_to(ROOT)) for p in named_files() if not p.exists())
    assert not missing, f"README names paths that do not exist: {missing}"


def test_every_module_is_in_the_table():
    named = named_files()
    folders = {p for p in named if p.is_dir()}
    modules = [p for top in ("pipeline", "models") for p in (ROOT / top).rglob("*.py")
               if p.name != "__init__.py"]
    unnamed = sorted(str(p.relative_to(ROOT)) for p in modules
                     if p not in named and p.parent not in folders - {ROOT / "pipeline"})
    assert not unnamed, f"modules missing from the README's table: {unnamed}"
