"""The README and docs/ stay complete, short and linked: no torch, no MLflow, no server.

- every `cnnflow` command (pipelines.cli.COMMANDS) and every MLproject entry point is
  mentioned in README.md or docs/*.md, so a new command cannot ship undocumented, and every
  command has an example in README.md itself (a line of a code block starting `cnnflow <cmd>`);
- README.md is at most 300 lines (reference material belongs in docs/);
- every relative link in README.md, docs/*.md and benchmarks/README.md points to a file that
  exists, and its `#anchor`, when it has one, to a heading of that file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipelines.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 300


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def linked_files() -> list[Path]:
    return [*doc_files(), ROOT / "benchmarks" / "README.md"]


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans: where links live."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def links(text: str) -> list[str]:
    """Targets of inline links `[text](target)` and reference definitions `[id]: target`."""
    body = prose(text)
    inline = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", body)
    refs = re.findall(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", body, flags=re.M)
    return inline + refs


def is_relative(target: str) -> bool:
    return not re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", target) and not target.startswith("//")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub does (-1, -2)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def mentions_command(text: str, command: str) -> bool:
    return re.search(rf"\bcnnflow {re.escape(command)}(?![\w-])", text) is not None


def mentions_entry_point(text: str, entry_point: str) -> bool:
    return re.search(rf"(?<![\w-])-e {re.escape(entry_point)}(?![\w-])", text) is not None


def code_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks, stripped."""
    blocks = re.findall(r"^(```|~~~)[^\n]*\n(.*?)^\1", text, flags=re.M | re.S)
    return [line.strip() for _, block in blocks for line in block.splitlines()]


def all_docs_text() -> str:
    return "\n".join(path.read_text() for path in doc_files())


def entry_points() -> list[str]:
    return sorted(yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_is_documented(command: str):
    assert mentions_command(all_docs_text(), command), (
        f"`cnnflow {command}` is in pipelines/cli.py COMMANDS but neither README.md nor "
        "docs/*.md mentions it: add an example")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_readme_shows_every_command(command: str):
    assert any(mentions_command(line, command) and line.startswith("cnnflow ")
               for line in code_lines(README.read_text())), (
        f"README.md has no example of `cnnflow {command}`: add one line to its command list")


@pytest.mark.parametrize("entry_point", entry_points())
def test_every_mlproject_entry_point_is_documented(entry_point: str):
    assert mentions_entry_point(all_docs_text(), entry_point), (
        f"MLproject entry point `{entry_point}` is not shown as `mlflow run . -e {entry_point}` "
        "in README.md or docs/*.md")


def test_the_mention_checks_tell_one_name_from_another():
    text = "Run `cnnflow run-all` or `cnnflow pseudo-label`; `mlflow run . -e main2`."
    assert not mentions_command(text, "run")
    assert mentions_command(text, "pseudo-label")
    assert not mentions_command(text, "pseudo")
    assert not mentions_entry_point(text, "main")
    assert mentions_entry_point("mlflow run . -e main -P x=1", "main")
    page = "text `cnnflow eda`\n```bash\ncnnflow train --epochs 1  # x\n```\n"
    assert code_lines(page) == ["cnnflow train --epochs 1  # x"]


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference material "
        "into docs/")


@pytest.mark.parametrize("doc", linked_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in links(doc.read_text()):
        if not is_relative(target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target} (no file {path.relative_to(ROOT)})")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no heading #{anchor} in {path.relative_to(ROOT)})")
    assert broken == [], f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_the_link_check_sees_links_and_anchors(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# Title: `cnnflow up`\n## Title: `cnnflow up`\n"
                    "see [a](other.md#x) and [b](https://example.com)\n"
                    "```\n[not a link](missing.md)\n```\n[ref]: ./ref.md\n")
    assert links(page.read_text()) == ["other.md#x", "https://example.com", "./ref.md"]
    assert [t for t in links(page.read_text()) if is_relative(t)] == ["other.md#x", "./ref.md"]
    assert anchors(page) == {"title-cnnflow-up", "title-cnnflow-up-1"}


def test_the_readme_says_how_mlflow_run_finds_the_server():
    text = README.read_text()
    assert mentions_command(text, "env") and "export MLFLOW_TRACKING_URI" in text, (
        "README.md must show `eval \"$(cnnflow env)\"` / `export MLFLOW_TRACKING_URI=...`: "
        "without it `mlflow run` tracks to MLflow's default local store, not cnnflow's server")
