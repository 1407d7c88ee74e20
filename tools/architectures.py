"""Regenerate docs/architectures.md and the README's supported-families line from the coverage matrix.

    python tools/architectures.py          # write both files
    python tools/architectures.py --check  # exit 1 when either differs from a fresh run
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantbench.testing.coverage import run_matrix  # noqa: E402
from quantbench.testing.coverage_doc import readme_section, render, replace_readme_section  # noqa: E402


def main(check: bool) -> int:
    m = run_matrix()
    for line in m.failures():
        print(f"FAIL {line}", file=sys.stderr)
    doc, readme = ROOT / "docs" / "architectures.md", ROOT / "README.md"
    want = {doc: render(m), readme: replace_readme_section(readme.read_text(), readme_section(m))}
    stale = [p for p, text in want.items() if not p.exists() or p.read_text() != text]
    if check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is stale: run python tools/architectures.py", file=sys.stderr)
        return 1 if stale or m.failures() else 0
    for p in stale:
        p.write_text(want[p])
        print(f"wrote {p.relative_to(ROOT)}")
    return 1 if m.failures() else 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv[1:]))
