"""Reading a stage's recipe: the YAML named by `--config` (or the stage's default), then the command line over it.

Every training script parses the same way, so the idiom lives here once: TrlParser reads the YAML and lets any key
be overridden on the command line; its ValueError (an unknown key, a bad value) becomes a PoemDPOError that names it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import yaml
from trl import TrlParser

from poemdpo.errors import PoemDPOError


def with_default_recipe(argv: Sequence[str], recipe: str) -> list[str]:
    """`argv` with `--config recipe` in front when it names no recipe of its own (and is not asking for --help)."""
    argv = list(argv)
    if "--config" in argv or {"-h", "--help"} & set(argv):
        return argv
    return ["--config", recipe, *argv]


def parse_recipe(parser: TrlParser, argv: Sequence[str]) -> tuple:
    """The parser's dataclasses, filled from the recipe and then the command line."""
    try:
        return parser.parse_args_and_config(args=list(argv))
    except ValueError as e:  # unknown keys in the recipe or on the command line, bad values
        raise PoemDPOError(str(e)) from None


def read_recipe(argv: Sequence[str]) -> dict:
    """The recipe named by `--config` as a mapping ({} without one)."""
    if "--config" not in argv:
        return {}
    index = list(argv).index("--config") + 1
    config_path = argv[index] if index < len(argv) else ""
    if not os.path.isfile(config_path):
        raise PoemDPOError(f"recipe {config_path!r} does not exist")
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise PoemDPOError(f"recipe {config_path!r} must be a YAML mapping of argument names to values")
    return config


def method_named(argv: Sequence[str]) -> str | None:
    """The value of `--method` on the command line (the last one given), else None. train_dpo.py and train_rl.py read
    it before the full parse: the method decides the config class."""
    named = None
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            named = argv[i + 1]
        elif arg.startswith("--method="):
            named = arg.split("=", 1)[1]
    return named


def argument_keys(argv: Sequence[str]) -> set[str]:
    """Every key set in the recipe or on the command line."""
    return {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")} | set(read_recipe(argv))
