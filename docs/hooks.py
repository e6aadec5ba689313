"""MkDocs hooks: the reference pages are generated from the code each time the docs are built, so
they cannot drift from it (``<!-- generated: cli -->`` and ``<!-- generated: recipe -->``)."""

from __future__ import annotations

import argparse
from typing import Any


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(action: argparse.Action) -> str:
    if action.help is None:
        return ""
    text = action.help % {"default": action.default, "prog": ""} if "%(" in action.help else action.help
    return text.replace("|", "\\|").replace("\n", " ")


def _command(name: str, parser: argparse.ArgumentParser, level: int) -> list[str]:
    out = [f"{'#' * level} `flora-train {name}`", ""]
    if parser.description:
        out += [parser.description, ""]
    out += ["```", parser.format_usage().replace("usage: ", "").strip(), "```", ""]
    rows = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
            continue
        names = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.dest}`"
        default = "" if a.default in (None, False, argparse.SUPPRESS) or not a.option_strings else f"`{a.default}`"
        choices = f" One of: {', '.join(map(str, a.choices))}." if a.choices else ""
        rows.append(f"| {names} | {default} | {_help(a)}{choices} |")
    if rows:
        out += ["| argument | default | meaning |", "|---|---|---|", *rows, ""]
    for sub, p in _subcommands(parser).items():
        out += _command(f"{name} {sub}", p, level + 1)
    return out


def cli_markdown() -> str:
    from flora_train.cli import build_parser

    root = build_parser()
    helps = {}
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in action._choices_actions}
    out = ["| command | what it does |", "|---|---|"]
    out += [f"| [`{n}`](#flora-train-{n}) | {helps.get(n, '')} |" for n in _subcommands(root)]
    out.append("")
    for name, parser in _subcommands(root).items():
        if helps.get(name) and not parser.description:
            parser.description = helps[name]
        out += _command(name, parser, 2)
    return "\n".join(out)


def recipe_markdown() -> str:
    from flora_train.config.reference import recipe_reference_markdown

    return recipe_reference_markdown()


GENERATED = {"<!-- generated: cli -->": cli_markdown, "<!-- generated: recipe -->": recipe_markdown}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for marker, make in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
