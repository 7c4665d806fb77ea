"""The built-in demo family: corpus, held-out split and model locations.

The demo family is three small Llama-architecture models (small / medium / large)
trained by ``scripts/train_demo_family.py`` on text that every Python install
carries: the running interpreter's standard-library ``.py`` sources (code) and
the reference prose in ``pydoc_data.topics`` (prose).

The train / held-out split is by file (code) and by topic key (prose), decided by
a hash of the relative path / key, so it is the same on every machine and for every
interpreter version (a file that exists in one version but not another just lands
on a fixed side of the split).

Nothing here imports torch or transformers: this module only reads files.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .orchestrator.tiers import TIER_ORDER

__all__ = [
    "TIERS",
    "DEMO_DIR",
    "CODE_HELD_OUT_PERCENT",
    "PROSE_HELD_OUT_PERCENT",
    "demo_model_path",
    "stdlib_dir",
    "is_held_out",
    "code_files",
    "prose_topics",
    "function_docstrings",
    "module_docstring",
    "held_out_samples",
    "Split",
    "split",
]

TIERS = TIER_ORDER  # the demo family has every tier

# repo_root/models/demo (this file is repo_root/src/sizewise/demo.py)
DEMO_DIR = Path(__file__).resolve().parents[2] / "models" / "demo"

CODE_HELD_OUT_PERCENT = 5
PROSE_HELD_OUT_PERCENT = 12
_SALT = "sizewise-demo-v1:"

# Directories (relative to the stdlib root) that are not part of the corpus:
# test suites, installed third-party packages, build configuration, and the
# charmap tables in encodings/ (huge generated tables, not code worth learning).
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
    "encodings",
}
_SKIP_FILES = {
    # the prose corpus itself, as a Python literal: used as prose, not as code
    "pydoc_data/topics.py",
}
_MAX_FILE_BYTES = 400_000


def demo_model_path(tier: str) -> Path:
    """Directory of a demo tier (``small`` / ``medium`` / ``large``)."""
    if tier not in TIERS:
        raise ValueError(f"unknown demo tier {tier!r}; expected one of {TIERS}")
    return DEMO_DIR / tier


def stdlib_dir() -> Path:
    """The running interpreter's pure-Python standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _bucket(name: str) -> int:
    digest = hashlib.sha1((_SALT + name).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 100


def is_held_out(name: str, kind: str) -> bool:
    """Whether a code file (relative posix path) or prose topic key is held out."""
    if kind == "code":
        return _bucket("code:" + name) < CODE_HELD_OUT_PERCENT
    if kind == "prose":
        return _bucket("prose:" + name) < PROSE_HELD_OUT_PERCENT
    raise ValueError(f"kind must be 'code' or 'prose', not {kind!r}")


def code_files(root: Path | None = None) -> list[str]:
    """Sorted relative posix paths of the standard-library ``.py`` files in the corpus."""
    root = Path(root) if root is not None else stdlib_dir()
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        # config-3.11-x86_64-linux-gnu and the like: build configuration
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-") and not d.startswith("test_")
        )
        for fn in filenames:
            if not fn.endswith(".py"):
                continue
            if fn.startswith("_sysconfigdata"):
                continue
            rel = (rel_dir / fn).as_posix()
            if rel in _SKIP_FILES:
                continue
            full = Path(dirpath) / fn
            try:
                size = full.stat().st_size
            except OSError:
                continue
            if 0 < size <= _MAX_FILE_BYTES:
                out.append(rel)
    out.sort()
    return out


def read_code(rel: str, root: Path | None = None) -> str | None:
    """Text of a stdlib file, or None if it is not valid UTF-8."""
    root = Path(root) if root is not None else stdlib_dir()
    try:
        return (root / rel).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def prose_topics() -> dict[str, str]:
    """``pydoc_data.topics.topics``: the language reference prose, by topic key (sorted)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped-down install
        return {}
    return {k: topics[k] for k in sorted(topics)}


def module_docstring(source: str) -> str | None:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    return ast.get_docstring(tree)


def function_docstrings(source: str, min_chars: int = 40, max_chars: int = 700) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the documented functions and classes of a source file."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                doc = ast.get_docstring(child)
                if doc and min_chars <= len(doc) <= max_chars and not child.name.startswith("_"):
                    out.append((name, doc))
                if isinstance(child, ast.ClassDef):
                    visit(child, name + ".")

    visit(tree, "")
    return out


@dataclass(slots=True)
class Split:
    train_code: list[str]
    held_out_code: list[str]
    train_prose: list[str]
    held_out_prose: list[str]


def split(root: Path | None = None) -> Split:
    """The deterministic train / held-out split of the corpus of the running interpreter."""
    files = code_files(root)
    keys = list(prose_topics())
    return Split(
        train_code=[f for f in files if not is_held_out(f, "code")],
        held_out_code=[f for f in files if is_held_out(f, "code")],
        train_prose=[k for k in keys if not is_held_out(k, "prose")],
        held_out_prose=[k for k in keys if is_held_out(k, "prose")],
    )


def held_out_samples(chars_per_doc: int = 500, docs: int = 6, root: Path | None = None) -> dict[str, str]:
    """A small deterministic sample of held-out text: ``{"code": str, "prose": str}``.

    Takes the first ``chars_per_doc`` characters (cut back to a line end) of each of the
    first ``docs`` held-out code files (largest-first order would depend on versions, so
    sorted by path) and held-out prose topics of at least that length. Pieces are joined
    with blank lines. About 100 tokens per piece with the demo tokenizer.
    """
    s = split(root)
    code_parts: list[str] = []
    for rel in s.held_out_code:
        text = read_code(rel, root)
        if not text or len(text) < chars_per_doc:
            continue
        code_parts.append(_cut(text, chars_per_doc))
        if len(code_parts) == docs:
            break
    topics = prose_topics()
    prose_parts: list[str] = []
    for key in s.held_out_prose:
        text = topics[key]
        if len(text) < chars_per_doc:
            continue
        prose_parts.append(_cut(text, chars_per_doc))
        if len(prose_parts) == docs:
            break
    return {"code": "\n\n".join(code_parts), "prose": "\n\n".join(prose_parts)}


def _cut(text: str, n: int) -> str:
    head = text[:n]
    nl = head.rfind("\n")
    return head[: nl + 1] if nl > n // 2 else head
