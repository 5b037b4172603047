"""Documentation references resolve: every section reference to method.md (`method.md` + section sign + N or
N.M, or the section sign alone) names a heading of docs/method.md, the path is written `docs/method.md` or
`method.md`, and no file points outside the repository."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SECTION = "\u00a7"  # written as an escape so that this file's own examples are not references
#: `## 3. Title` or `### 2.3 Title` -> "3" / "2.3"
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s")
#: section sign + "2", "2.3", and ranges "2–3" / "2-" + section sign + "3" (a trailing full stop is not
#: part of the number)
REFERENCE = re.compile(SECTION + r"\s?(\d+(?:\.\d+)?)(?:\s?[\u2013-]\s?" + SECTION + r"?(\d+(?:\.\d+)?))?")
CITES_METHOD = re.compile(r"method\.md\W{0,2}$")
#: a path ending in method.md, with whatever directories precede it
METHOD_PATH = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*)method\.md\b")
#: where the repository's text lives when git cannot list it
SCAN_DIRS = ("didi", "backbones", "datamodules", "benchmarks", "configs", "docs", "tests")
SCAN_FILES = ("README.md", "BENCHMARKS.md")
#: paths outside the repository that no file may point at
FORBIDDEN = (".." + "/shared", "shared" + "/design")


@dataclass(frozen=True)
class Reference:
    """One section reference: where it is, the section it names, and whether it names method.md explicitly."""

    where: str  # "path:line"
    section: str
    explicit: bool

    def __str__(self) -> str:
        form = "method.md " if self.explicit else "bare "
        return f"{self.where}: {form}{SECTION}{self.section} has no heading in docs/method.md"


def section_numbers(markdown: str) -> list[str]:
    """Section numbers of the markdown headings, in order (`## 3. X` -> "3", `### 2.3 Y` -> "2.3")."""
    return [m.group(1) for line in markdown.splitlines() if (m := HEADING.match(line))]


def references(path: str, text: str) -> list[Reference]:
    """Every section reference of `text`; a range a–b names every section from a to b when both are whole."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in REFERENCE.finditer(line):
            explicit = bool(CITES_METHOD.search(line[: m.start()]))
            first, last = m.group(1), m.group(2)
            if last is not None and first.isdigit() and last.isdigit() and int(first) < int(last):
                sections = [str(i) for i in range(int(first), int(last) + 1)]
            else:
                sections = [first] + ([last] if last is not None else [])
            out += [Reference(f"{path}:{lineno}", s, explicit) for s in sections]
    return out


def unresolved(path: str, text: str, sections: set[str]) -> list[Reference]:
    """The references of `text` that name no section in `sections`."""
    return [r for r in references(path, text) if r.section not in sections]


def wrong_paths(path: str, text: str) -> list[str]:
    """`path:line: written` for every method.md path other than `method.md` and `docs/method.md`."""
    return [
        f"{path}:{n}: {m.group(0)}"
        for n, line in enumerate(text.splitlines(), 1)
        for m in METHOD_PATH.finditer(line)
        if m.group(1) not in ("", "docs/")
    ]


def repository_files() -> list[Path]:
    """Tracked files (`git ls-files`); without git, a walk of the directories that hold the text."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [ROOT / p for p in listed.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        files = [p for d in SCAN_DIRS for p in sorted((ROOT / d).rglob("*")) if p.is_file()]
        files += [ROOT / f for f in SCAN_FILES]
    return sorted({f for f in files if f.is_file()} | {METHOD})


def read_text(path: Path) -> str | None:
    """The file as UTF-8 text, or None for a binary file (a NUL byte or invalid UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def text_files() -> list[tuple[str, str]]:
    """(path relative to the repository, text) of every text file to check."""
    out = []
    for p in repository_files():
        text = read_text(p)
        if text is not None:
            out.append((p.relative_to(ROOT).as_posix(), text))
    return out


# ------------------------------------------------------------------------------------------- the parser
def test_parser_finds_the_missing_section():
    doc = "# Title\n## 1. One\n### 1.2 Sub\n## 2. Two\n"
    sections = set(section_numbers(doc))
    assert sections == {"1", "1.2", "2"}
    text = (
        f"ok: method.md {SECTION}1.2 and docs/method.md {SECTION}2.\n"
        f"bad: method.md {SECTION}1.3, bare {SECTION}7, range {SECTION}1\u20133\n"
    )
    bad = unresolved("x.py", text, sections)
    assert [(r.where, r.section, r.explicit) for r in bad] == [
        ("x.py:2", "1.3", True),
        ("x.py:2", "7", False),
        ("x.py:2", "3", False),
    ]
    assert f"x.py:2: method.md {SECTION}1.3 has no heading" in str(bad[0])
    assert [r.section for r in references("y.md", f"{SECTION}2-{SECTION}3, {SECTION}4.")] == ["2", "3", "4"]
    doubled = "docs/" + "docs/method.md"  # split so that this file does not contain the wrong path itself
    assert wrong_paths("z.py", f"docs/method.md, method.md\n({doubled})") == [f"z.py:2: {doubled}"]


# ---------------------------------------------------------------------------------------- the repository
def test_method_md_headings_are_numbered_uniquely():
    numbers = section_numbers(METHOD.read_text(encoding="utf-8"))
    assert numbers, "docs/method.md has no numbered headings"
    dupes = sorted({n for n in numbers if numbers.count(n) > 1})
    assert not dupes, f"docs/method.md numbers these sections twice: {dupes}"
    orphans = [n for n in numbers if "." in n and n.rsplit(".", 1)[0] not in numbers]
    assert not orphans, f"docs/method.md has subsections without their section: {orphans}"


def test_every_section_reference_resolves():
    sections = set(section_numbers(METHOD.read_text(encoding="utf-8")))
    found, bad = 0, []
    for path, text in text_files():
        found += len(references(path, text))
        bad += unresolved(path, text, sections)
    assert found >= 10, f"only {found} {SECTION} references found: is the pattern still right?"
    assert not bad, "references to missing sections:\n" + "\n".join(map(str, bad))


def test_method_md_is_cited_by_its_path():
    bad = [w for path, text in text_files() for w in wrong_paths(path, text)]
    assert not bad, "method.md cited under a wrong path (write docs/method.md):\n" + "\n".join(bad)


def test_no_file_points_outside_the_repository():
    hits = [
        f"{path}:{n}: {needle}"
        for path, text in text_files()
        for n, line in enumerate(text.splitlines(), 1)
        for needle in FORBIDDEN
        if needle in line
    ]
    assert not hits, "files that point outside the repository:\n" + "\n".join(hits)
