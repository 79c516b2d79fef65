"""The documentation is honest: every flag it gives a program exists in that program's parser, every path
of the repository it names exists, and every page it links to is there.

Parsers are read by running each program's entry point with its ``parse_args`` intercepted, so the flags
come from the code itself, not from a copy of them.
"""
from __future__ import annotations

import argparse
import glob
import re
import runpy
import shlex
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
TOP_FOLDERS = ("modules", "dataloaders", "runtime", "training", "retrieval", "analysis", "demo", "preprocess",
               "scripts", "benchmarks", "tests", "docs")
TOP_FILES = ("main.py", "search_videos.py", "search_for_best_r1_with_qb_norm.py", "environment.yml",
             "requirements.txt", "requirements-dev.txt", "pyproject.toml", "README.md")
# flags of other programs that the docs show in front of ours (torchrun, pip, ...)
FOREIGN_FLAGS = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port", "--index-url",
                 "--extra-index-url", "--headless", "--no-sandbox", "--logdir", "--standalone", "--rdzv_backend",
                 "--rdzv_endpoint", "--upgrade", "--help", "--no-deps", "--version", "--name", "--file"}


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


@lru_cache(maxsize=None)
def program_flags(program: str) -> frozenset:
    """The --flags of ``program``: a repository file ("main.py") or a module ("analysis.compare_runs")."""
    original = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    argv = sys.argv
    try:
        sys.argv = [program]
        if program.endswith(".py"):
            runpy.run_path(str(REPO / program), run_name="__main__")
        else:
            with warnings.catch_warnings():  # runpy's note when the module was imported by an earlier test
                warnings.simplefilter("ignore", RuntimeWarning)
                runpy.run_module(program, run_name="__main__", alter_sys=False)
    except _Captured as caught:
        return frozenset(_option_strings(caught.parser))
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = original
        sys.argv = argv
    raise AssertionError(f"{program} parsed no arguments")


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()  # comments
        if line:
            lines.extend(part.strip() for part in re.split(r"\s(?:\||&&|;)\s", line))
    return lines


def _tokens(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def program_of(tokens: list[str]) -> tuple[str | None, int]:
    """(program, index of its token) of a command line, or (None, -1) when it runs none of ours."""
    for i, tok in enumerate(tokens):
        if tok == "-m" and i + 1 < len(tokens):
            module = tokens[i + 1]
            if module.split(".")[0] in TOP_FOLDERS:
                return module, i + 1
            return None, -1
        name = tok.split("/")[-1]
        if tok in ("main.py", "search_videos.py", "search_for_best_r1_with_qb_norm.py"):
            return tok, i
        if tok == "scripts/demo.sh":
            return "demo", i  # the demo script runs python -m demo with its flags
        if re.fullmatch(r"scripts/\w+\.sh", tok):
            return "main.py", i  # the other scripts pass their extra flags on to main.py
        if re.fullmatch(r"benchmarks/\w+\.py", tok) and name != "__init__.py":
            return tok, i
    return None, -1


def doc_commands():
    for doc in DOCS:
        for block in _code_blocks(doc.read_text()):
            for command in _commands(block):
                tokens = _tokens(command)
                program, at = program_of(tokens)
                if program:
                    flags = [t.split("=")[0] for t in tokens[at + 1:] if re.fullmatch(r"--[a-z][\w-]*(=.*)?", t)]
                    yield doc.name, command, program, flags


def test_every_flag_in_a_documented_command_exists():
    bad, seen = [], 0
    for doc, command, program, flags in doc_commands():
        known = program_flags(program)
        seen += 1
        for flag in flags:
            if flag not in known:
                bad.append(f"{doc}: {program} has no {flag} (in: {command[:100]})")
    assert seen > 20, "no documented command was found"
    assert not bad, "\n".join(bad)


def _inline_flags(text: str) -> set[str]:
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found = set()
    for span in re.findall(r"`([^`\n]+)`", prose):
        found.update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", span))
    return found


def test_every_flag_named_in_prose_exists_somewhere():
    programs = ({p for _, _, p, _ in doc_commands()} | {"main.py", "search_videos.py"}
                | {f"benchmarks/{p.name}" for p in (REPO / "benchmarks").glob("*.py") if "def main" in p.read_text()}
                | {f"preprocess.{p.stem}" for p in (REPO / "preprocess").glob("*.py") if "add_argument(" in p.read_text()})
    known = set(FOREIGN_FLAGS)
    for program in programs:
        known |= program_flags(program)
    bad = [f"{doc.relative_to(REPO)}: {flag}" for doc in DOCS for flag in sorted(_inline_flags(doc.read_text()))
           if flag not in known]
    assert not bad, "flags that no program has: " + ", ".join(bad)


PATH_RE = re.compile(r"(?<![\w./-])((?:%s)/[\w./*-]*[\w*/]|(?:%s))(?![\w/-])" % (
    "|".join(TOP_FOLDERS), "|".join(re.escape(f) for f in TOP_FILES)))


def _repo_paths(text: str) -> set[str]:
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)) + _code_blocks(text)
    found = set()
    for span in spans:
        for path in PATH_RE.findall(span):
            found.add(path.rstrip("."))
    return found


def _exists(path: str) -> bool:
    if "*" in path:
        return bool(glob.glob(str(REPO / path)))
    return (REPO / path).exists()


def test_every_repository_path_named_exists():
    bad = [f"{doc.relative_to(REPO)}: {path}" for doc in DOCS for path in sorted(_repo_paths(doc.read_text()))
           if not _exists(path)]
    assert not bad, "paths that do not exist: " + ", ".join(bad)


def test_every_module_run_with_python_m_exists():
    bad = []
    for doc in DOCS:
        for module in re.findall(r"python -m ([\w.]+)", doc.read_text()):
            if module.split(".")[0] not in TOP_FOLDERS:
                continue  # pytest, pip, venv ...
            base = REPO / module.replace(".", "/")
            if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
                bad.append(f"{doc.relative_to(REPO)}: python -m {module}")
    assert not bad, ", ".join(bad)


def test_every_linked_page_exists():
    bad = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            if not (doc.parent / target).exists():
                bad.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not bad, "broken links: " + ", ".join(bad)


def test_readme_is_a_front_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("text, expected", [
    ("python main.py --do_train 1 --nosuch 2", ("main.py", ["--do_train", "--nosuch"])),
    ("torchrun --nproc_per_node 2 main.py --batch_size 8", ("main.py", ["--batch_size"])),
    ("NUM_GPUS=1 bash scripts/msrvtt.sh --epochs 1", ("main.py", ["--epochs"])),
    ("python -m analysis.compare_runs a b --dsl", ("analysis.compare_runs", ["--dsl"])),
    ("pip install -r requirements-dev.txt", (None, [])),
])
def test_command_parsing(text, expected):
    tokens = _tokens(text)
    program, at = program_of(tokens)
    flags = [t for t in tokens[at + 1:] if t.startswith("--")] if program else []
    assert (program, flags) == expected


def test_a_missing_flag_is_seen():
    assert "--do_train" in program_flags("main.py")
    assert "--nosuch_flag" not in program_flags("main.py")
    assert {"--index", "--checkpoint"} <= program_flags("search_videos.py")
