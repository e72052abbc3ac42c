"""README.md and docs/*.md: every repository path they name exists, and every link resolves.

The README is the entry point and the reference lives in docs/, so a section that moves,
a file that is renamed or a page that was never written breaks a link or names a path that
is not there. These tests find both, with the file and line of each, and need no service.

What counts as a repository path: an inline code span or a link target, relative (not
`/etc/dtsd/...`, `/run/...`, `~/...`), without a scheme (not `https://...`), that either
starts with a top-level entry of the checkout (`dtsd/store.py`, `tests/deb/run-test.sh`,
`.ci/run`) or has a slash and a file's extension (`research/performance.md`), or is a bare
`NAME.md` (`DESIGN.md`). `<placeholder>` matches anything and `{a,b}` is each of its
words; a path under a placeholder (`<runtime_dir>/node.json`, `OUT/pglog.txt`) is not
the repository's. Paths that the build makes, not the checkout, are in GENERATED.
Anchors follow GitHub's rules: the heading's text, lower case, without punctuation but
`-` and `_`, spaces made `-`, and `-1`, `-2`... after a repeated one.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

#: Where a path is made by a make target or at run time, not kept in the repository.
GENERATED = (".run/", "build/", "debian/", ".venv-pypi/", ".venv-peers/")

#: Extensions that make `a/b.EXT` a file name, not a MIME type or a time zone.
EXTENSIONS = {"md", "py", "sh", "sql", "proto", "yml", "yaml", "json", "ini", "png", "service",
              "conf", "txt", "toml", "cfg", "html", "js", "css", "j2", "pem", "Debian"}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def doc_files() -> list[Path]:
    """The documents checked: the README and every page of docs/."""
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


@lru_cache(maxsize=None)
def repository_paths() -> frozenset[str]:
    """Every tracked file and each directory above one, relative to the root. Outside a git
    checkout (an exported tree), whatever is on disk."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, check=True,
                             capture_output=True, text=True).stdout
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.rglob("*") if p.is_file()]
    paths = set(files)
    for name in files:
        parts = name.split("/")
        paths.update("/".join(parts[:n]) for n in range(1, len(parts)))
    return frozenset(paths)


def top_level() -> set[str]:
    return {path.split("/")[0] for path in repository_paths()}


def slug(text: str) -> str:
    """GitHub's anchor for a heading's text (before the -N of a repeated one)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)   # a link: its text
    text = re.sub(r"<[^>]+>", "", text)                        # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@dataclass
class Doc:
    """A markdown file as the checks see it: its anchors, its links and its code spans,
    each with the line it is on; nothing inside fenced code blocks."""
    path: Path
    anchors: set[str] = field(default_factory=set)
    links: list[tuple[int, str]] = field(default_factory=list)
    spans: list[tuple[int, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.path.relative_to(REPO_ROOT))


def parse(path: Path, text: str | None = None) -> Doc:
    """The document at `path` in the checkout; `text`, when given, is its content instead
    of the file's."""
    doc = Doc(path)
    seen: dict[str, int] = {}
    fenced = False
    text = path.read_text() if text is None else text
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            doc.anchors.add(base if count == 0 else f"{base}-{count}")
        doc.anchors.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
        spans = CODE_SPAN.findall(line)
        doc.spans += [(number, text.strip()) for _, text in spans]
        bare = CODE_SPAN.sub("", line)            # a link inside a code span is not a link
        doc.links += [(number, target) for target in LINK.findall(bare)]
    return doc


def expand(text: str) -> list[str]:
    """`a/{b,c}.md` -> a/b.md, a/c.md; `<x>` -> `*` (for fnmatch)."""
    text = re.sub(r"<[^<>]+>", "*", text)
    match = re.search(r"\{([^{}]*)\}", text)
    if not match:
        return [text]
    return [out for word in match.group(1).split(",")
            for out in expand(text[:match.start()] + word + text[match.end():])]


def repository_path(text: str) -> str | None:
    """The repository path a code span names, or None when it names none (see the module's
    docstring): `dtsd/store.py` is one, `/etc/dtsd/dtsd.ini`, `Europe/Berlin`,
    `application/json`, `redis://host` and `dtsctl status` are not."""
    if (not text or re.search(r"[\s=:$'\"|;()\[\]]", text) or text.startswith(("/", "~", "-"))
            or text.startswith(GENERATED) or "/" not in text and not text.endswith(".md")):
        return None
    first = text.split("/")[0]
    if first.startswith("<") or first.isupper():
        return None                      # `<runtime_dir>/node.json`, `OUT/pglog.txt`
    extension = text.rstrip("/").rsplit("/", 1)[-1].rpartition(".")[2]
    if first in top_level() or text.endswith(".md") or (
            "/" in text and "." in text.rsplit("/", 1)[-1] and extension in EXTENSIONS):
        return text.rstrip("/")
    return None


def exists(path: str) -> bool:
    """Whether the path, a pattern of expand()'s, is a tracked file or directory."""
    paths = repository_paths()
    return all(any(fnmatch.fnmatchcase(p, pattern) for p in paths) if "*" in pattern
               else pattern in paths for pattern in expand(path))


def broken_paths(docs: list[Doc]) -> list[str]:
    return [f"{doc.name}:{number}: `{text}` is not in the repository"
            for doc in docs for number, text in doc.spans
            if (path := repository_path(text)) and not exists(path)]


def broken_links(docs: list[Doc]) -> list[str]:
    """Each link of the documents that does not resolve: a file that is not there, or an
    anchor its file does not have. Links to other sites are not followed."""
    by_path = {doc.path.resolve(): doc for doc in docs}
    out = []
    for doc in docs:
        for number, target in doc.links:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue                              # https:, mailto:
            where, _, anchor = target.partition("#")
            file = (doc.path.parent / where).resolve() if where else doc.path.resolve()
            try:
                relative = str(file.relative_to(REPO_ROOT.resolve()))
            except ValueError:
                out.append(f"{doc.name}:{number}: {target} leaves the repository")
                continue
            if where and relative not in repository_paths():
                out.append(f"{doc.name}:{number}: {target}: no file {relative}")
                continue
            if anchor:
                if file not in by_path and file.suffix == ".md" and file.exists():
                    by_path[file] = parse(file)
                target_doc = by_path.get(file)
                if target_doc is None:
                    out.append(f"{doc.name}:{number}: {target}: an anchor into a non-document")
                elif anchor not in target_doc.anchors:
                    out.append(f"{doc.name}:{number}: {target}: {relative} has no heading "
                               f"#{anchor}")
    return out


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return [parse(path) for path in doc_files()]


def test_the_readme_links_every_page_of_docs(docs):
    """A page of docs/ that the README does not link is one nobody finds."""
    readme = docs[0]
    linked = {(REPO_ROOT / target.partition("#")[0]).resolve() for _, target in readme.links}
    assert [doc.name for doc in docs[1:] if doc.path.resolve() not in linked] == []


def test_every_path_the_documents_name_exists(docs):
    broken = broken_paths(docs)
    assert not broken, "\n".join(broken)


def test_every_path_the_layout_names_exists():
    """docs/layout.md is a code block, a path and what it holds on each line."""
    layout = (REPO_ROOT / "docs" / "layout.md").read_text()
    block = re.search(r"^```\n(.*?)^```", layout, re.S | re.M).group(1)
    named = [line.split()[0] for line in block.splitlines() if line.strip()]
    assert len(named) > 40
    assert [path for path in named if not exists(path.rstrip("/"))] == []


def test_every_link_resolves(docs):
    broken = broken_links(docs)
    assert not broken, "\n".join(broken)


def test_the_checks_catch_what_they_are_for():
    """The checks fail on a broken link, a missing anchor and a missing path, and leave
    alone what names no repository path."""
    doc = parse(REPO_ROOT / "docs" / "a-page.md", (
        "# A page\n\n## Its part\n\n## Its part\n\n"
        "[ok](#its-part-1) [ok](../README.md#install-on-debian-12)\n"
        "[ok](images/web-overview.png)\n"
        "[bad](#no-such-part) [bad](../README.md#no-such-part) [bad](no-such-page.md)\n"
        "`dtsd/store.py` `dtsd/no_such_module.py` `DESIGN.md` `research/performance.md`\n"
        "`bench/results/peers-<date>-<commit>.{md,json,png}` `dtsd/{v1,seed}/`\n"
        "`/etc/dtsd/dtsd.ini` `/run/dtsd` `https://example.com/a.md` `Europe/Berlin`\n"
        "`application/octet-stream` `.run/dtsd.ini` `dtsctl status` `[server] listen`\n"
        "`<runtime_dir>/web/` `OUT/pglog.txt`\n"
        "```\n[bad but fenced](#nowhere) `fenced/no_such.py`\n```\n"))
    assert {"a-page", "its-part", "its-part-1"} <= doc.anchors
    assert [line.split(": ", 1)[1] for line in broken_links([doc])] == [
        "#no-such-part: docs/a-page.md has no heading #no-such-part",
        "../README.md#no-such-part: README.md has no heading #no-such-part",
        "no-such-page.md: no file docs/no-such-page.md"]
    assert [line.split(": ", 1)[1] for line in broken_paths([doc])] == [
        "`dtsd/no_such_module.py` is not in the repository",
        "`DESIGN.md` is not in the repository",
        "`research/performance.md` is not in the repository"]
