"""Every reference in the docs and the code points to something that exists.

- README.md and docs/*.md: every repository path they mention (`tec_fast/models/tec.py`,
  `docs/tec.md`, ...) and every relative Markdown link resolves to a file or folder.
- The code (tec_fast/, kernels/, benchmarks/, csrc/, setup.py, comments and --help text alike):
  no mention of the private briefs SPEC.md / DESIGN.md (they are not in the repository: cite
  docs/tec.md and docs/architecture.md), every `docs/...` and repository path exists, and every
  `docs/tec.md §N` names a section that docs/tec.md has.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_DIRS = ("tec_fast", "kernels", "benchmarks", "csrc", "tests")
CODE_SUFFIXES = {".py", ".sh", ".cpp", ".cu", ".h"}
# First path components that name the repository's own folders (a mention like
# `ATen/core/Tensor.h` in an #include or `OUT/info.txt` in a script is not one of ours).
REPO_DIRS = {"tec_fast", "kernels", "csrc", "benchmarks", "tests", "docs", ".ci"}

# a path with at least one slash and a file extension: `a/b.py`, `../README.md`; placeholders
# such as `kernels/<op>.py` or `results/*.jsonl` do not match
PATH = re.compile(r"(?<![\w./\-])((?:\.\./)*(?:[\w\-][\w.\-]*/)+[\w\-][\w.\-]*"
                  r"\.(?:py|md|sh|cpp|cu|h|toml|txt))(?![\w/])")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
URL = re.compile(r"[a-z]+://\S+")
BRIEF = re.compile(r"\b(SPEC|DESIGN)\.md\b")
TEC_SECTION = re.compile(r"docs/tec\.md\s*(?:section\s*|§\s*)(\d+)(?:\s*[-–]\s*§?\s*(\d+))?")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    yield from enumerate(path.read_text(encoding="utf-8").splitlines(), 1)


def _code_files() -> list[Path]:
    files = [ROOT / "setup.py"]
    for folder in CODE_DIRS:
        files += sorted(p for p in (ROOT / folder).rglob("*")
                        if p.suffix in CODE_SUFFIXES and "__pycache__" not in p.parts
                        and p != Path(__file__).resolve())  # this checker names what it looks for
    return files


def _exists(mention: str, base: Path) -> bool:
    mention = mention.split("#", 1)[0].rstrip("/")
    return not mention or (ROOT / mention).exists() or (base / mention).exists()


def _tec_sections() -> set:
    text = (ROOT / "docs" / "tec.md").read_text(encoding="utf-8")
    return {int(n) for n in re.findall(r"^#+\s*§(\d+)\b", text, flags=re.MULTILINE)}


def test_doc_paths_and_links_exist():
    missing = []
    for doc in DOCS:
        for number, line in _lines(doc):
            line = URL.sub("", line)
            for target in LINK.findall(line):
                if not target.startswith(("#", "mailto:")) and not _exists(target, doc.parent):
                    missing.append(f"{doc.relative_to(ROOT)}:{number}: link {target}")
            for mention in PATH.findall(line):
                if not _exists(mention, doc.parent):
                    missing.append(f"{doc.relative_to(ROOT)}:{number}: {mention}")
    assert not missing, "references to files that do not exist:\n" + "\n".join(missing)


def test_code_cites_no_private_brief():
    cited = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in _code_files() for number, line in _lines(path) if BRIEF.search(line)]
    assert not cited, ("SPEC.md / DESIGN.md are not in the repository; cite docs/tec.md §N or "
                       "docs/architecture.md instead:\n" + "\n".join(cited))


def test_code_paths_exist():
    missing = []
    for path in _code_files():
        for number, line in _lines(path):
            line = URL.sub("", line)
            for mention in PATH.findall(line):
                if mention.split("/", 1)[0] in REPO_DIRS and not _exists(mention, path.parent):
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {mention}")
            for mention in re.findall(r"(?<![\w/])docs/[\w.\-]+", line):
                if not (ROOT / mention).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {mention}")
    assert not missing, "references to files that do not exist:\n" + "\n".join(missing)


def test_tec_section_citations_exist():
    sections = _tec_sections()
    assert sections >= {1, 2, 3, 4, 5}, f"docs/tec.md must keep its sections §1-§5, has {sorted(sections)}"
    bad = []
    for path in _code_files() + DOCS:
        for number, line in _lines(path):
            for first, last in TEC_SECTION.findall(line):
                wanted = range(int(first), int(last or first) + 1)
                if not set(wanted) <= sections:
                    bad.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bad, "citations of sections docs/tec.md does not have:\n" + "\n".join(bad)


# A flag in prose or a command line: `--batch-size`, `--precision bf16` (not an em dash, not `---`).
FLAG = re.compile(r"(?<![\w\-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
# Flags of other programs that the docs show in command lines (pip, torchrun, pytest, git).
FOREIGN_FLAGS = {"--no-build-isolation", "--no-deps", "--nproc-per-node", "--nnodes", "--node-rank",
                 "--max-restarts", "--standalone", "--rdzv-endpoint", "--rdzv-backend", "--rdzv-id",
                 "--master-addr", "--master-port", "--help", "--upgrade", "--index-url", "--extra-index-url"}
OP = re.compile(r"(?<![\w.])(?:tec_fast\.)?ops\.([a-z_][a-z0-9_]*)\b")


def _declared_flags() -> set:
    """Every option string the code declares (a quoted "--flag" in the Python and shell sources of
    the commands and benchmarks)."""
    flags = set()
    for path in _code_files():
        if path.suffix in (".py", ".sh") and "tests" not in path.relative_to(ROOT).parts:
            flags.update(re.findall(r"[\"'](--[a-z][a-z0-9\-]*)[\"']", path.read_text(encoding="utf-8")))
            if path.suffix == ".sh":
                flags.update(FLAG.findall(path.read_text(encoding="utf-8")))
    return flags


def test_docs_name_only_flags_that_exist():
    known = _declared_flags() | FOREIGN_FLAGS
    unknown = [f"{doc.relative_to(ROOT)}:{number}: {flag}" for doc in DOCS
               for number, line in _lines(doc) for flag in FLAG.findall(URL.sub("", line))
               if flag not in known]
    assert not unknown, "flags the docs name but no command declares:\n" + "\n".join(unknown)


def test_docs_name_only_ops_that_exist():
    from tec_fast import ops
    unknown = [f"{doc.relative_to(ROOT)}:{number}: ops.{name}" for doc in DOCS
               for number, line in _lines(doc) for name in OP.findall(line) if not hasattr(ops, name)]
    assert not unknown, "ops the docs name that tec_fast.ops does not have:\n" + "\n".join(unknown)
