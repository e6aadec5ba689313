"""The documentation cannot drift from the code: the site builds with ``mkdocs build --strict``
(broken links and missing pages fail) with its reference generated from the parser and the schema;
every `flora-train` command shown in the README or the docs parses with the real parser; every
recipe shown validates against the schema; every recipe key named in the prose exists."""

import argparse
import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flora_train.cli import build_parser, parse_args
from flora_train.config.reference import recipe_keys
from flora_train.config.schema import Recipe

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]
SECTIONS = ("base", "adapter", "data", "train", "eval", "store", "tracking", "export", "launch")


def code_blocks(path: Path) -> list[tuple[str, int, str]]:
    """``(language, first line number, text)`` of every fenced block of a markdown file (a block
    inside a list item loses its fence's indentation)."""
    out, lang, start, indent, body = [], None, 0, 0, []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"^(\s*)```(\w*)", line)
        if fence and lang is None:
            lang, start, indent, body = fence.group(2), n + 1, len(fence.group(1)), []
        elif fence:
            out.append((lang, start, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line[indent:] if line[:indent].strip() == "" else line)
    return out


def commands(path: Path) -> list[tuple[int, list[str]]]:
    """Each `flora-train ...` command line of a shell block, continuations joined, comments and
    anything after a pipe or redirect dropped; ``a|b`` alternatives become ``a``; ``[...]``
    optional parts are left out."""
    found = []
    for lang, start, text in code_blocks(path):
        if lang not in ("bash", "sh", "shell", "console", ""):
            continue
        joined, first = "", None
        for k, line in enumerate(text.splitlines()):
            first = start + k if not joined else first
            joined += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
            if line.rstrip().endswith("\\"):
                continue
            cmd, joined = joined.strip(), ""
            cmd = re.sub(r"^\$\s+", "", cmd)
            if not cmd.startswith("flora-train "):
                continue
            cmd = re.sub(r"\s+#.*$", "", cmd)
            cmd = re.split(r"\s(?:\||>|&&|2>)\s", cmd)[0]
            cmd = re.sub(r"\[[^\]]*\]", "", cmd)
            tokens = [t.split("|")[0] if "|" in t and not t.startswith(("'", '"')) else t for t in shlex.split(cmd)[1:]]
            found.append((first, [t for t in tokens if t != "..."]))
    return found


def _arguments(parser: argparse.ArgumentParser, path: str = "flora-train"):
    """Every argument of every command and subcommand, with the command's name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _arguments(sub, f"{path} {name}")
        else:
            yield path, action


def test_the_docs_build_strict_with_the_reference_generated_from_the_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in subs.items():
        assert f"flora-train {name}" in cli, name
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help" and action.help != argparse.SUPPRESS:
                    assert flag in cli, (name, flag)
    silent = [f"{name} {a.option_strings[0] if a.option_strings else a.dest}" for name, a in _arguments(parser)
              if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not silent, f"arguments the reference and --help would say nothing about: {silent}"
    recipe = (tmp_path / "site" / "reference" / "recipe" / "index.html").read_text()
    for key in recipe_keys():
        assert f"<code>{key.key}</code>" in recipe, key.key
        assert key.section or key.help, f"{key.key} has no comment in schema.py: the reference would say nothing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_shown_parses_with_the_real_parser(page):
    for line, args in commands(page):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parse_args(args)
        except SystemExit:
            message = err.getvalue().strip().splitlines()[-1]
            # An upper-case placeholder where a number goes (`--pack-size N`) is how docs write it.
            assert re.search(r"invalid \w+ value: '[A-Z][A-Z_0-9]*'", message), f"{page.name}:{line}: {args}: {message}"


def test_every_recipe_shown_validates_and_every_key_named_exists():
    keys = {k.key for k in recipe_keys()}
    schema = OmegaConf.structured(Recipe)
    checked, problems = 0, []
    for page in PAGES:
        for lang, line, text in code_blocks(page):
            if lang != "yaml":
                continue
            doc = OmegaConf.create(text)
            if not any(k in SECTIONS or k == "run_dir" for k in doc):
                continue
            try:
                OmegaConf.merge(schema, {"run_dir": "x"}, doc)
                checked += 1
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{page.name}:{line}: {exc}")
        prose = page.read_text()
        for m in re.finditer(r"`((?:%s)\.[a-z_][a-z0-9_.]*[a-z0-9_])(?:[=:][^`]*)?`" % "|".join(SECTIONS), prose):
            key = m.group(1)
            if key not in keys and not any(k.startswith(key + ".") for k in keys):
                problems.append(f"{page.name}: `{key}` is not a recipe key")
    assert not problems, "\n".join(problems)
    assert checked >= 3, "the docs show recipes"
