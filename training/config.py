"""YAML recipes as argparse defaults (command line wins), the saved effective config, and the
linear learning-rate scaling rule."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cli_shell import UserError


class ConfigError(UserError):
    """A recipe file that cannot be read or names an unknown option."""


def normalise_key(key: str) -> str:
    """YAML keys may be written as flags (``lr-warmup-epochs``) or as argparse dests (``lr_warmup_epochs``)."""
    return str(key).lstrip("-").replace("-", "_")


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat YAML mapping of option name -> value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return {normalise_key(k): v for k, v in data.items()}


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help")}


def apply_config(parser: argparse.ArgumentParser, config: dict[str, Any], source: str = "config") -> None:
    """Set ``config`` as the parser's defaults after checking every key names a known option."""
    actions = _actions_by_dest(parser)
    unknown = sorted(k for k in config if k not in actions or k == "config")
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
    for key, value in config.items():
        action = actions[key]
        flag_action = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        if (flag_action or isinstance(action, argparse.BooleanOptionalAction)) and not isinstance(value, bool):
            raise ConfigError(f"{source}: option {key} takes true/false, got {value!r}")
        if action.type is not None and value is not None and not isinstance(value, str | list):
            # argparse converts string defaults with ``type`` but leaves others alone: do the same for
            # YAML numbers, so ``lr: 1`` becomes 1.0 for a float option.
            try:
                value = action.type(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: option {key} cannot take {value!r}") from exc
        config[key] = value
    parser.set_defaults(**config)


def check_choices(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse does not check defaults against ``choices``; recipes set defaults, so check them here."""
    for dest, action in _actions_by_dest(parser).items():
        if action.choices is None or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is not None and value not in action.choices:
            parser.error(f"argument {dest}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with ``-c/--config FILE`` recipes applied as defaults (later files win, the command
    line wins over all). ``parser`` must define ``-c/--config`` (``action="append"``)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    for path in known.config:
        try:
            apply_config(parser, load_config(path), source=str(path))
        except ConfigError as exc:
            parser.error(str(exc))
    args = parser.parse_args(argv)
    check_choices(parser, args)
    return args


def args_to_dict(args: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
    """A plain, YAML/JSON-safe copy of parsed arguments (paths as strings, tuples as lists)."""
    items = vars(args) if isinstance(args, argparse.Namespace) else args

    def plain(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        return str(value)

    return {k: plain(v) for k, v in items.items()}


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    """The dests a recipe may set (every option except ``-c/--config`` itself)."""
    return [dest for dest in _actions_by_dest(parser) if dest != "config"]


def save_config(
    args: argparse.Namespace | dict[str, Any],
    path: str | os.PathLike,
    *,
    keys: list[str] | None = None,
    header: str = "",
) -> Path:
    """Write the configuration as YAML (atomically), restricted to ``keys`` when given so that the file
    can be passed back with ``-c``; ``header`` lines are written as comments on top."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = args_to_dict(args)
    if keys is not None:
        values = {k: values[k] for k in keys if k in values}
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(comment + yaml.safe_dump(values, sort_keys=False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def scaled_lr(lr: float, total_batch_size: int, base_batch_size: int | None) -> float:
    """Linear scaling rule (Goyal et al. 2017): the learning rate grows with the total batch size.

    ``base_batch_size`` is the total batch (all processes) the recipe's ``lr`` was tuned for.
    """
    if not base_batch_size:
        raise ConfigError("--scale-lr needs --lr-base-batch (the total batch size the recipe's lr was tuned for)")
    return lr * total_batch_size / base_batch_size
