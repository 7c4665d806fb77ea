"""The docs stand on their own: every relative link in the repository's Markdown resolves to a file
inside the repository, and every repository path the docs name in a code span exists (a reader
who follows one lands somewhere, not on a path that moved or never shipped with the clone)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "node_modules", "build"}
DOCS = sorted(p for p in ROOT.rglob("*.md") if not SKIP_DIRS & set(p.relative_to(ROOT).parts))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a code span that names a file by a path under one of the repository's top-level folders
CODE_PATH = re.compile(r"`((?:\.\./)*[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)+\.(?:py|md|yaml|yml|sh|json|toml|txt|png))`")
TOP = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in SKIP_DIRS}


def _relative_links(text: str) -> list[str]:
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor in the same page
        out.append(target.split("#", 1)[0])
    return out


def _shown(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix() if doc.is_relative_to(ROOT) else str(doc)


def test_docs_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "docs/design.md", "docs/routing.md", "docs/platforms.md"} <= names, names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_inside_the_repository(doc: Path):
    broken = []
    for target in _relative_links(doc.read_text(encoding="utf-8")):
        path = (doc.parent / target).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(target)
    assert not broken, f"{_shown(doc)}: links that lead nowhere in the repository: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_repository_paths_named_in_code_spans_exist(doc: Path):
    missing = []
    for name in CODE_PATH.findall(doc.read_text(encoding="utf-8")):
        if name.startswith("../"):  # a doc pointing outside the clone (e.g. ../shared/) points at nothing
            path = (doc.parent / name).resolve()
            if not (path.is_relative_to(ROOT) and path.exists()):
                missing.append(name)
            continue
        if name.split("/", 1)[0] not in TOP:
            continue  # not a path of this repository (a user's own dir, a site-packages path)
        if not ((ROOT / name).exists() or (doc.parent / name).exists()):
            missing.append(name)
    assert not missing, f"{_shown(doc)}: names files the repository does not have: {missing}"


def test_the_checker_sees_a_broken_link_and_a_missing_path(tmp_path):
    text = "see [x](docs/nope.md), [ok](https://example.com), [a](#anchor), `scripts/nope.py` and `../shared/DESIGN.md`"
    assert _relative_links(text) == ["docs/nope.md"]
    assert CODE_PATH.findall(text) == ["scripts/nope.py", "../shared/DESIGN.md"]
    doc = tmp_path / "README.md"
    doc.write_text(text)
    with pytest.raises(AssertionError, match="DESIGN.md"):
        test_repository_paths_named_in_code_spans_exist(doc)
