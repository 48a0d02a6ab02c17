"""The README and the reference pages stay honest: their examples run, and every file, flag, link
and table row they show exists once.

Pages: README.md, docs/*.md, benchmarks/README.md. A section whose body says "(coming" is a
placeholder for work not landed yet: its heading and that line may name a flag or file that
does not exist yet; nothing else may.
"""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

README_MAX_LINES = 450
# Top-level folders of the repository: a path starting with one of them must exist.
REPO_DIRS = ("docs", "benchmarks", "tests", "data", ".ci")
# Files of other projects the pages name on purpose.
OTHER_PROJECTS_FILES = {"eval_image_retrieval.py"}  # DINO's retrieval script
# Flags of third-party commands the pages use, by command.
THIRD_PARTY_FLAGS = {
    "torchrun": {"--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint"},
}
PLACEHOLDER = "(coming"

FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
PY_FILE = re.compile(r"(?<![\w/.~$-])((?:[\w.-]+/)*[\w-]+\.py)\b")
REPO_PATH = re.compile(r"(?<![\w/.~$-])((?:" + "|".join(re.escape(d) for d in REPO_DIRS)
                       + r")/[\w./-]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


# --------------------------------------------------------------------------- reading pages


def pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md")),
            root / "benchmarks" / "README.md"]


def split_fences(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code lines) as (line number, text); fence lines belong to neither."""
    prose, code, in_code = [], [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        else:
            (code if in_code else prose).append((number, line))
    return prose, code


def placeholder_lines(text: str) -> set[int]:
    """Line numbers that may name what is not there yet: the heading of a section whose body
    says "(coming", and the "(coming" lines themselves."""
    prose, _ = split_fences(text)
    exempt: set[int] = set()
    heading = None
    for number, line in prose:
        if line.startswith("#"):
            heading = number
        elif PLACEHOLDER in line:
            exempt.add(number)
            if heading is not None:
                exempt.add(heading)
    return exempt


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.lstrip("#").strip().replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    prose, _ = split_fences(path.read_text())
    for _, line in prose:
        if re.match(r"#{1,6} ", line):
            base = slug(line)
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


def commands(text: str) -> list[tuple[int, str]]:
    """Shell commands of the page: code-block lines joined at trailing backslashes, and inline
    code spans that start with python/torchrun; each cut at && ; | and at a # comment."""
    prose, code = split_fences(text)
    joined: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, line in code:
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append((start, pending + line))
        pending = ""
    for number, line in prose:
        for span in re.findall(r"`([^`]+)`", line):
            if re.match(r"(python3?|torchrun)\s", span):
                joined.append((number, span))
    result = []
    for number, line in joined:
        line = re.sub(r"(^|\s)#.*$", "", line)
        for part in re.split(r"&&|;|\|(?!\|)", line):
            if part.strip():
                result.append((number, part.strip()))
    return result


# --------------------------------------------------------------------------- the scripts' flags


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    # --help too: main_massl's get_args_parser() leaves it to the command-line parser built on it
    return {s for s in parser._option_string_actions if s.startswith("--")} | {"--help"}


@pytest.fixture(scope="session")
def script_flags(repo_root) -> dict[str, set[str]]:
    """The long flags of every command-line script (top level and benchmarks/), by path: from
    its get_args_parser() when it has one, else from its --help."""
    flags: dict[str, set[str]] = {}
    bench_dir = str(repo_root / "benchmarks")
    added = bench_dir not in sys.path
    if added:
        sys.path.insert(0, bench_dir)
    try:
        for path in sorted([*repo_root.glob("*.py"), *(repo_root / "benchmarks").glob("*.py")]):
            source = path.read_text()
            if "ArgumentParser(" not in source and "get_args_parser" not in source:
                continue
            rel = path.relative_to(repo_root).as_posix()
            if re.search(r"^def get_args_parser\(", source, re.M):
                module = importlib.import_module(path.stem)
                flags[rel] = parser_flags(module.get_args_parser())
            elif "__main__" in source:
                out = subprocess.run([sys.executable, str(path), "--help"], cwd=repo_root,
                                     capture_output=True, text=True, timeout=120)
                assert out.returncode == 0, f"{rel} --help failed: {out.stderr[-500:]}"
                flags[rel] = set(FLAG.findall(out.stdout))
    finally:
        if added:
            sys.path.remove(bench_dir)
    assert "main_massl.py" in flags and "benchmarks/bench_data.py" in flags
    return flags


# --------------------------------------------------------------------------- the checks


def test_readme_is_a_guide_not_a_reference(repo_root):
    lines = (repo_root / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference to docs/")


def test_every_reference_page_is_linked_from_the_readme(repo_root):
    readme = (repo_root / "README.md").read_text()
    linked = {(repo_root / target.split("#")[0]).resolve() for target in LINK.findall(readme)}
    for page in pages(repo_root)[1:]:
        assert page.resolve() in linked, f"README.md does not link {page.relative_to(repo_root)}"


def test_every_named_file_exists(repo_root):
    problems = []
    for page in pages(repo_root):
        text = page.read_text()
        exempt = placeholder_lines(text)
        for number, line in enumerate(text.splitlines(), 1):
            if number in exempt:
                continue
            for name in PY_FILE.findall(line):
                candidates = [repo_root / name] if "/" in name else [
                    repo_root / name, repo_root / "benchmarks" / name, repo_root / "tests" / name]
                if name not in OTHER_PROJECTS_FILES and not any(c.is_file() for c in candidates):
                    problems.append(f"{page.name}:{number}: {name}")
            for name in REPO_PATH.findall(line):
                if not name.endswith(".py") and not (repo_root / name.rstrip(".")).exists():
                    problems.append(f"{page.name}:{number}: {name}")
    assert not problems, "files named but missing:\n" + "\n".join(problems)


def test_every_flag_exists(repo_root, script_flags):
    """A flag after a script in a command is that script's; any other flag is some script's
    (or a third-party command's, listed above)."""
    every_flag = set().union(*script_flags.values(), *THIRD_PARTY_FLAGS.values())
    problems = []
    for page in pages(repo_root):
        text = page.read_text()
        exempt = placeholder_lines(text)
        for number, line in enumerate(text.splitlines(), 1):
            for flag in FLAG.findall(line):
                if number not in exempt and flag.split("=")[0] not in every_flag:
                    problems.append(f"{page.name}:{number}: {flag} is no script's flag")
        for number, command in commands(text):
            words = command.split()
            scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
            if not scripts or number in exempt:
                continue
            script = words[scripts[0]]
            if script not in script_flags and "/" not in script:
                script = next((s for s in script_flags if s.endswith("/" + script)), script)
            assert script in script_flags, f"{page.name}:{number}: {script} has no flags we know"
            tool = words[0]
            for word in words[:scripts[0]]:
                if word.startswith("--") and word.split("=")[0] not in THIRD_PARTY_FLAGS.get(tool, ()):
                    problems.append(f"{page.name}:{number}: {word} is not a {tool} flag")
            for word in words[scripts[0] + 1:]:
                if FLAG.fullmatch(word.split("=")[0]) and word.split("=")[0] not in script_flags[script]:
                    problems.append(f"{page.name}:{number}: {script} has no {word}")
    assert not problems, "\n".join(problems)


def test_every_link_resolves(repo_root):
    problems = []
    for page in pages(repo_root):
        prose, _ = split_fences(page.read_text())
        for number, line in prose:
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                resolved = (page.parent / path).resolve() if path else page
                if not resolved.exists():
                    problems.append(f"{page.name}:{number}: {target} does not exist")
                elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                    problems.append(f"{page.name}:{number}: {target}: no heading #{anchor}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_no_table_row_is_repeated(repo_root):
    """Within a table, each row's first cell (what the row is about) appears once."""
    problems = []
    for page in pages(repo_root):
        prose, _ = split_fences(page.read_text())
        table: dict[str, int] = {}
        last = -1
        for number, line in prose:
            if not line.startswith("|"):
                continue
            if number != last + 1:
                table = {}
            last = number
            first = line.strip("|").split("|")[0].strip()
            if re.fullmatch(r":?-+:?", first):
                continue
            if first in table:
                problems.append(f"{page.name}:{number}: row '{first}' repeats line {table[first]}")
            table[first] = number
    assert not problems, "\n".join(problems)


def test_layout_lists_every_top_level_python_file(repo_root):
    readme = (repo_root / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for path in sorted(repo_root.glob("*.py")):
        assert f"`{path.name}`" in layout, f"{path.name} missing from the README's layout"


# --------------------------------------------------------------------------- the examples run


def api_blocks(repo_root: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (repo_root / "docs" / "api.md").read_text(), re.S)


def test_library_api_example_runs(repo_root):
    code = next(b for b in api_blocks(repo_root) if "MemoryBank" in b)
    namespace: dict = {}
    exec(compile(code, "docs/api.md:MemoryBank example", "exec"), namespace)
    assert namespace["student"].grad is not None  # backward reached the student
    assert int(namespace["memory"].ptr) == 64


def test_trainer_example_runs(repo_root, capsys):
    code = next(b for b in api_blocks(repo_root) if "MaSSLTrainer" in b)
    namespace: dict = {}
    exec(compile(code, "docs/api.md:MaSSLTrainer example", "exec"), namespace)
    assert namespace["trainer"].global_step == 1
    assert "'loss':" in capsys.readouterr().out
