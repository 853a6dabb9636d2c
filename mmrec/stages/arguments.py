"""Command-line parsing that ends in the stages' one-line error rather than a parser's traceback or page."""

from __future__ import annotations

from argparse import ArgumentError

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from mmrec.errors import InputError

MESSAGE_LIMIT = 400
"""Longest error message printed: configuration errors can quote whole values."""


def one_line(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """A parser or library message on one line, shortened to ``limit`` characters."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_or_refuse(parser: ArgumentParser, argv: list[str], stage: str) -> Namespace:
    """``parser.parse_args(argv)`` (the parser built with ``exit_on_error=False``); a bad option becomes one
    ``InputError`` line that names it and points at ``--help``."""
    try:
        return parser.parse_args(argv)
    except ArgumentError as exc:
        raise InputError(f"{one_line(str(exc))} (mmrec {stage} --help lists the options)") from None


def stage_parser(stage: str, description: str, config_help: str = "a YAML configuration (repeatable; later wins)") -> ArgumentParser:
    """The parser of a stage that is not a LightningCLI: ``mmrec <stage>`` in its help, ``--config`` files, and
    errors raised rather than printed, so that :func:`parse_or_refuse` can turn them into the one-line error."""
    parser = ArgumentParser(prog=f"mmrec {stage}", description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help=config_help)
    return parser
