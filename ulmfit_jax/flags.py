"""Command-line flags generated from a frozen dataclass, so that a script's settings are declared
once (the dataclass) and every field is a flag with the field's type and default.

    parser = argparse.ArgumentParser()
    flags.add_flags(parser, DemoSettings)              # --wiki-words INT, --classifier-lr FLOAT, ...
    settings = flags.from_args(DemoSettings, parser.parse_args())

Field types: int, float, str, pathlib.Path, bool (`--name` / `--no-name`), `X | None` of those
(the flag takes an X; its default may be None). A field's `metadata={"help": ...}` becomes the
flag's help. Fields without a default become required flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import types
import typing

_SCALARS = (int, float, str, pathlib.Path)


def flag_name(field_name: str, prefix: str = "") -> str:
    """`classifier_lr` -> `--classifier-lr` (`prefix` goes in front: `--demo-classifier-lr`)."""
    return "--" + (prefix + field_name).replace("_", "-")


def _scalar_type(annotation, where: str):
    """The flag's type for a field annotation: a scalar, or the scalar of `X | None`."""
    if annotation in _SCALARS or annotation is bool:
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1 and members[0] in _SCALARS:
            return members[0]
    raise TypeError(f"{where}: no flag for a field of type {annotation!r} (int, float, str, Path, bool, "
                    "or one of those | None)")


def add_flags(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """One flag per field of the dataclass `cls`; the parsed value lands in `prefix + field.name`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        kind = _scalar_type(hints[field.name], f"{cls.__name__}.{field.name}")
        if field.default is not dataclasses.MISSING:
            default, required = field.default, False
        elif field.default_factory is not dataclasses.MISSING:
            default, required = field.default_factory(), False
        else:
            default, required = None, True
        help_text = field.metadata.get("help", "")
        if not required:
            help_text = f"{help_text} (default {default})".strip()
        options = dict(dest=prefix + field.name, default=default, required=required, help=help_text)
        if kind is bool:
            parser.add_argument(flag_name(field.name, prefix), action=argparse.BooleanOptionalAction, **options)
        else:
            parser.add_argument(flag_name(field.name, prefix), type=kind,
                                metavar=kind.__name__.upper(), **options)


def from_args(cls, args: argparse.Namespace, prefix: str = ""):
    """The dataclass `cls` built from the flags `add_flags` added (the other attributes of `args`
    are ignored)."""
    return cls(**{field.name: getattr(args, prefix + field.name) for field in dataclasses.fields(cls) if field.init})


def as_argv(instance, prefix: str = "", only_changed: bool = True) -> list[str]:
    """The flags that give `instance` back through `add_flags` + `from_args` (by default only the
    fields that differ from their defaults): for running a script with these settings."""
    argv = []
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if not field.init or (only_changed and field.default is not dataclasses.MISSING and value == field.default):
            continue
        if isinstance(value, bool):
            argv.append(flag_name(field.name, prefix) if value else "--no-" + flag_name(field.name, prefix)[2:])
        elif value is not None:
            argv += [flag_name(field.name, prefix), str(value)]
    return argv
