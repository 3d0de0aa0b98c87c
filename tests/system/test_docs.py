"""The documentation checked against the code: README.md and docs/*.md.

- docs/config.md lists every config key of the schema (dtrain/config.py), no key the schema lacks, and
  each key's default as the schema has it. The page's format is fixed and stated at its top: one table
  row per key, `| \\`section.key\\` | type | \\`default\\` | meaning |`.
- Every relative link and every repository path the pages mention resolves: markdown links (and their
  #anchors, against the headings of the target page), backquoted paths under a top-level folder of the
  repository, bare `*.py` file names, and modules run with `python -m`.
- README.md stays a front page: under 12 KiB.
- The pages speak of the product only: no citations of the specification files the docs replace and no
  words of the work process that produced them.

No processes, no torch: these run in well under a second.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import typing
from pathlib import Path

import pytest

from dtrain.config import Config
from tests import harness

ROOT = Path(harness.repo_root())
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
CONFIG_PAGE = DOCS / "config.md"

# Top-level entries of the repository: a backquoted token starting with one of these is a path to check.
TOP_LEVEL = {"parallel", "dtrain", "launch", "tests", "docs", "configs", "scripts", ".ci"}
ROOT_FILES = {"README.md", "pyproject.toml"}


# --- (a) the config reference ---------------------------------------------------------------------------


def schema_keys(cls: type = Config, prefix: str = "") -> dict[str, object]:
    """Every leaf key of the config schema, dotted (`model.moe.top_k`), with its default."""
    hints = typing.get_type_hints(cls)
    out: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(schema_keys(kind, name + "."))
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out[name] = default
    return out


ROW = re.compile(r"^\|\s*`([A-Za-z_][\w.]*)`\s*\|([^|]*)\|\s*`([^`]*)`\s*\|")


def documented_keys(text: str) -> dict[str, str]:
    """`section.key` -> documented default (the literal between backquotes), from the reference's rows."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            key, _, default = m.groups()
            assert key not in out, f"docs/config.md lists `{key}` twice"
            out[key] = default
    return out


def parse_default(literal: str) -> object:
    """A YAML-ish literal as written in the reference: null, true/false, an int, a float, else a string."""
    lowered = literal.strip().lower()
    if lowered in ("null", "~"):  # YAML's nulls; `none` is a string (parallel.offload's default)
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered.startswith("[") and lowered.endswith("]"):  # a flow list of plain words
        return [item.strip() for item in literal.strip()[1:-1].split(",") if item.strip()]
    for kind in (int, float):
        try:
            return kind(literal)
        except ValueError:
            pass
    return literal.strip()


def test_schema_walk_sees_nested_sections():
    keys = schema_keys()
    assert "parallel.zero" in keys and "model.moe.top_k" in keys and "dist.timeout_s" in keys
    assert "model.moe" not in keys  # a section is not a key


def test_config_reference_lists_every_key_and_only_real_ones():
    documented = documented_keys(CONFIG_PAGE.read_text())
    schema = schema_keys()
    missing = sorted(set(schema) - set(documented))
    stale = sorted(set(documented) - set(schema))
    assert not missing, f"docs/config.md has no row for: {', '.join(missing)}"
    assert not stale, f"docs/config.md documents keys the schema does not have: {', '.join(stale)}"


def test_config_reference_defaults_match_the_schema():
    documented = documented_keys(CONFIG_PAGE.read_text())
    wrong = [
        f"{key}: documented `{documented[key]}`, schema {default!r}"
        for key, default in schema_keys().items()
        if key in documented and parse_default(documented[key]) != default
    ]
    assert not wrong, "docs/config.md defaults differ from dtrain/config.py:\n" + "\n".join(wrong)


# --- (b) links and paths ----------------------------------------------------------------------------------

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MODULE = re.compile(r"python3? -m ([A-Za-z_][\w.]*)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+?)\s*#*$", text, re.M)}


def path_tokens(text: str) -> set[str]:
    """Repository paths mentioned in backquotes or code blocks: tokens whose first component is a
    top-level folder of the repository, or one of its top-level files."""
    spans = INLINE.findall(FENCE.sub("", text)) + [b for b in FENCE.findall(text)]
    out = set()
    for span in spans:
        for token in re.split(r"[\s=\[\](),;:'\"<>|]+", span):
            token = token.rstrip(".")
            head = token.split("/")[0]
            if (head in TOP_LEVEL and "/" in token) or token in ROOT_FILES:
                out.add(token.rstrip("/"))
    return out


def bare_python_files(text: str) -> set[str]:
    """Backquoted file names without a folder (`test_zero.py`): they must exist somewhere in the tree."""
    return {s for s in INLINE.findall(FENCE.sub("", text)) if re.fullmatch(r"[\w]+\.py", s)}


def exists(path: str) -> bool:
    if any(c in path for c in "*?"):
        return bool(glob.glob(str(ROOT / path)))
    return (ROOT / path).exists()


def module_exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    package = any((base / f).is_file() for f in ("__init__.py", "__main__.py"))
    return base.with_suffix(".py").is_file() or package


def references(page: Path) -> list[tuple[str, str]]:
    """(kind, target) for everything on the page that must resolve."""
    text = page.read_text()
    refs = [("path", p) for p in sorted(path_tokens(text))]
    refs += [("file", f) for f in sorted(bare_python_files(text))]
    refs += [("module", m) for m in sorted(set(MODULE.findall(text))) if m.split(".")[0] in TOP_LEVEL]
    refs += [("link", t) for t in LINK.findall(FENCE.sub("", text))]
    return refs


def unresolved(page: Path) -> list[str]:
    bad = []
    for kind, target in references(page):
        if kind == "path":
            if not exists(target):
                bad.append(f"path `{target}`")
        elif kind == "file":
            if not any(ROOT.rglob(target)):
                bad.append(f"file `{target}`")
        elif kind == "module":
            if not module_exists(target):
                bad.append(f"module `python -m {target}`")
        elif not re.match(r"[a-z]+:", target):  # http(s), mailto: not checked
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            rel = os.path.relpath(dest, ROOT)
            if not dest.exists():
                bad.append(f"link ({target})")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"link ({target}): no heading with anchor #{anchor} in {rel}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_links_and_paths_resolve(page):
    bad = unresolved(page)
    assert not bad, f"{os.path.relpath(page, ROOT)}: unresolved " + "; ".join(bad)


def test_the_link_checker_catches_what_it_should(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\nSee `parallel/no_such.py`, `nothing_like_it.py`, [x](#nowhere), [y](missing.md) and\n"
        "```bash\npython -m dtrain.no_such_module configs/absent.yaml\n```\n"
    )
    bad = " ".join(unresolved(page))
    for expected in ("parallel/no_such.py", "nothing_like_it.py", "#nowhere", "missing.md"):
        assert expected in bad
    assert "dtrain.no_such_module" in bad and "configs/absent.yaml" in bad
    page.write_text("# Top\n\n`parallel/zero.py`, `test_docs.py`, [t](#top)\n")
    assert unresolved(page) == []


# --- (c) and (d): a short front page that speaks of the product -----------------------------------------


def test_readme_is_a_front_page():
    size = (ROOT / "README.md").stat().st_size
    assert size < 12 * 1024, f"README.md is {size} bytes; move detail into docs/ (limit 12 KiB)"


FORBIDDEN = [
    (re.compile(r"FORMULAS\.md|DESIGN\.md"), "cite docs/formulas.md or docs/design.md instead"),
    (re.compile(r"\bissues?\s*#?\d+", re.I), "a work-item number"),
    (re.compile(r"\blater\s+issues?\b", re.I), "planning language"),
    (re.compile(r"\bsessions?\b", re.I), "process language"),
    (re.compile(r"\bstop(s|ped|ping)?\b", re.I), "process language (say ends, exits, refuses)"),
    (re.compile(r"/work/"), "a path on one machine"),
]


@pytest.mark.parametrize("page", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_pages_speak_of_the_product(page):
    found = []
    for n, line in enumerate(page.read_text().splitlines(), 1):
        for pattern, why in FORBIDDEN:
            m = pattern.search(line)
            if m:
                found.append(f"line {n}: {m.group(0)!r} ({why})")
    assert not found, f"{os.path.relpath(page, ROOT)}: " + "; ".join(found)
