"""README.md is a short front page (issue 22 §2) whose details live in docs/: its config examples
validate, its links resolve, it names every command, and it stays under 15,000 characters."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import yaml

from quantbench.run.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKDOWN = [README, *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and (fence is None or m[1] == fence):
            fence = None if fence else m[1]
            continue
        if fence is None:
            out.append(line)
    return out


def _links(text: str) -> list[str]:
    """Markdown link targets in the prose (not in code blocks or inline code)."""
    prose = re.sub(r"(`+).*?\1", "", "\n".join(_prose_lines(text)), flags=re.S)
    return LINK.findall(prose)


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: the rendered text, lower-cased, every character but letters, marks,
    numbers, connector punctuation (`_`), spaces and hyphens removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    keep = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LMN"
                   or unicodedata.category(c) == "Pc")
    return keep.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeated ones."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text()):
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m[1])
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_github_slug_rules():
    assert github_slug("`quantbench recommend RUN_DIR`") == "quantbench-recommend-run_dir"
    assert github_slug("`quantbench compare RUN_DIR...`") == "quantbench-compare-run_dir"
    assert github_slug("The structural-fix experiment (`quantbench train`)") == "the-structural-fix-experiment-quantbench-train"
    assert github_slug("Tiny models of 4–32 layers (`benchmarks/memory.py`)") == "tiny-models-of-432-layers-benchmarksmemorypy"
    assert github_slug("GPTQ: sequential vs parallel") == "gptq-sequential-vs-parallel"


def test_readme_is_at_most_15000_characters():
    assert len(README.read_text()) <= 15_000


def test_every_relative_link_resolves():
    broken = []
    for md in MARKDOWN:
        for target in _links(md.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text()
    listed = {t for t in _links(index) if not t.startswith("..")}
    assert listed == {p.name for p in DOCS.glob("*.md") if p.name != "README.md"}


def test_readme_keeps_the_two_commands():
    # .ci/run runs `make test`: the README's set-up section must say exactly that
    section = README.read_text().split("## The two commands", 1)[1].split("\n## ", 1)[0]
    assert "make run     # creates .venv, installs, fetches the offline assets, runs configs/default.yaml" in section
    assert "make test    # creates .venv, installs, fetches the offline assets, runs the test suite" in section
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_names_every_command_with_a_link():
    import typer.main

    from quantbench.cli import app

    group = typer.main.get_command(app)
    names = [f"quantbench {n}" for n in group.commands if n != "assets"]
    names += [f"quantbench assets {n}" for n in group.commands["assets"].commands]
    table = README.read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `quantbench")]
    for name in names:
        cmd, _, sub = name.rpartition(" ") if name.startswith("quantbench assets") else (name, "", "")
        row = next((r for r in rows if f"`{cmd}" in r and (not sub or sub in r)), None)
        assert row is not None and _links(row), f"README's command table lacks {name} (with a link)"
    for md in ("commands.md", "config.md", "metrics.md", "limits.md"):
        assert f"(docs/{md})" in README.read_text(), md


def _config_example(text: str, heading: str) -> RunConfig:
    section = text.split(heading, 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)[1]
    return RunConfig.model_validate(yaml.safe_load(block))


def test_config_format_example_validates():
    cfg = _config_example((DOCS / "config.md").read_text(), "# Config format")
    mine = cfg.recipes[-1]
    assert [o.match for o in mine.overrides] == ["model.layers.11.mlp.down_proj", r"re:model\.layers\.(0|1)\..*"]
    assert mine.overrides[1].activations is None and "activations" in mine.overrides[1].replaces()
    assert cfg.export == ("w8a8-token",) and cfg.recommend.min_task_retention_pct is None


def test_readme_brief_config_example_validates():
    cfg = _config_example(README.read_text(), "## Config format")
    assert [r.name for r in cfg.recipes] == ["fp", "w8a8-token", "w4a16-g32", "my-w8a8"]
    assert cfg.export == ("w8a8-token",)
