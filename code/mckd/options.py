"""Typed command-line options: a frozen (or plain) dataclass whose fields are the flags.

A field declared with :func:`opt` is one option: its default is the dataclass default (stated
once), its help, type, choices and action are in the field's metadata, and its flag is the field
name with dashes unless ``flag=`` names another. :func:`add_options` turns a dataclass into an
argparse group; :func:`values_of` reads the parsed values back into the dataclass's keyword
arguments. The training command line (:mod:`mckd.config`), every criterion's options
(:mod:`mckd.criteria.options`) and the evaluation command line (``code/evaluate.py``) are built
this way.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import field, fields
from typing import Any, Callable


def opt(default: Any = None, help: str = "", *, flag: str | None = None, type: Any = None,  # noqa: A002
        choices: tuple | None = None, action: Any = None, aliases: tuple[str, ...] = (),
        nargs: Any = None, metavar: str | None = None, required: bool = False):
    """A dataclass field that is also a command-line option.

    Args:
        default: default value (also the dataclass default); a list is copied per instance.
        help: help text.
        flag: option string; defaults to the field name with dashes.
        type: argparse type; inferred from the default when None (str when the default is None).
        choices: allowed values.
        action: "store_true" or another argparse action (e.g. ``argparse.BooleanOptionalAction``).
        aliases: extra option strings.
        nargs, metavar, required: as in argparse.
    """
    meta = dict(help=help, flag=flag, type=type, choices=choices, action=action, aliases=aliases,
                nargs=nargs, metavar=metavar, required=required)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type_of(default)(default), metadata={"cli": meta})
    return field(default=default, metadata={"cli": meta})


type_of = type  # ``opt`` shadows the builtin with its argument


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are options (declared with :func:`opt`)."""
    return [f for f in fields(cls) if "cli" in f.metadata]


def flag_of(f: dataclasses.Field) -> str:
    """The main option string of a field."""
    return f.metadata["cli"]["flag"] or "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def add_options(parser: argparse.ArgumentParser, cls, *, title: str | None = None,
                description: str | None = None,
                dest: Callable[[str], str] = lambda name: name) -> argparse._ArgumentGroup:
    """Add one argparse group with an option per :func:`opt` field of ``cls``.

    Args:
        parser: the parser.
        cls: the dataclass.
        title: group title (default: the first line of the class docstring).
        description: group description.
        dest: maps a field name to its argparse destination.
    """
    doc = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
    group = parser.add_argument_group(title or doc, description)
    for f in cli_fields(cls):
        c = f.metadata["cli"]
        kwargs: dict[str, Any] = dict(dest=dest(f.name), help=c["help"], default=default_of(f))
        if c.get("required"):
            kwargs["required"] = True
        if c["action"] and c["type"] is None:
            kwargs["action"] = c["action"]
        elif c["action"]:  # a custom action with a value
            kwargs.update(action=c["action"], type=c["type"])
        else:
            d = kwargs["default"]
            kwargs["type"] = c["type"] or (type_of(d) if d is not None and not isinstance(d, (list, tuple))
                                           else str)
            if c["nargs"] is not None:
                kwargs["nargs"] = c["nargs"]
            if c["choices"]:
                kwargs["choices"] = c["choices"]
            else:
                kwargs["metavar"] = c["metavar"] or f.name.upper()
        group.add_argument(flag_of(f), *c["aliases"], **kwargs)
    return group


def values_of(cls, values: dict[str, Any], *, dest: Callable[[str], str] = lambda name: name) -> dict:
    """Keyword arguments of ``cls`` from parsed values (``vars(namespace)``); a field whose
    destination is absent keeps its default."""
    return {f.name: values[dest(f.name)] for f in cli_fields(cls) if dest(f.name) in values}


def finite_float(text: str) -> float:
    """argparse type: a finite float (``inf`` and ``nan`` are refused)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def finite_floats(parser: argparse.ArgumentParser) -> None:
    """Every float option of ``parser`` (sub-parsers included) refuses inf and nan."""
    for a in parser._actions:
        if a.type is float:
            a.type = finite_float
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                finite_floats(sub)
