"""The house budgets (DESIGN.md), checked in CI: the engine (graphopt/ without cli/ and
testing/) <= 2,000 lines, no module over 300 lines, README.md <= 10,000 characters."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE_LINES, MODULE_LINES, README_CHARS = 2000, 300, 10000


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def problems(root: Path = ROOT) -> list[str]:
    out = []
    engine = [p for p in (root / "graphopt").rglob("*.py") if not {"cli", "testing"} & set(p.parts)]
    total = sum(map(lines, engine))
    if total > ENGINE_LINES:
        out.append(f"the engine is {total} lines (budget {ENGINE_LINES})")
    for path in sorted([*(root / "graphopt").rglob("*.py"), *(root / "plugins").rglob("*.py")]):
        if lines(path) > MODULE_LINES:
            out.append(f"{path.relative_to(root)} is {lines(path)} lines (budget {MODULE_LINES})")
    chars = len((root / "README.md").read_bytes())   # bytes: a box-drawing character counts 3, as wc -c does
    if chars > README_CHARS:
        out.append(f"README.md is {chars} bytes (budget {README_CHARS} characters, counted as bytes)")
    return out


if __name__ == "__main__":
    found = problems()
    print("\n".join(found) or "budgets kept")
    sys.exit(1 if found else 0)
