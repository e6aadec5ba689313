"""`flora-train`: ``parser.py`` reads the command line, ``commands.py`` runs the command."""

from flora_train.cli.commands import main
from flora_train.cli.parser import build_parser, parse_args

__all__ = ["build_parser", "main", "parse_args"]
