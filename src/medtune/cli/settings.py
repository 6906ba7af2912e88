"""The ``medtune train`` flags and the settings table of ``docs/configuration.md``, generated from
the fields of :class:`medtune.config.TrainConfig` (their help, choices, unit and default).

Why not jsonargparse (what Lightning's ``LightningCLI`` uses): it derives a command line from the
same dataclass, but spells it its own way (``--rot90 false``, ``--fundus.crop true``, lists as
JSON) where medtune's flags are ``--no-rot90``, ``--fundus crop,mask``, ``--augment colour,blur``,
``--workers`` and ``--early-stopping 0``, which users and scripts already type; it would also be a
new dependency. So each field maps to one argparse flag here: its name, an ``action``, a ``type``
or a value parser, its help. The table of ``docs/configuration.md`` is rewritten by
``python -m medtune.cli.settings docs/configuration.md`` (``make docs``); a test checks it is
current.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medtune.config import TrainConfig, default_words

#: ``--fundus`` words and the FundusOptions field each one turns on.
FUNDUS_WORDS = {
    "crop": "crop",
    "mask": "mask",
    "colour-std": "colour_std",
    "clahe": "clahe",
    "ben-graham": "ben_graham",
}
FUNDUS_HELP = "none or crop" + "".join(f"[,{word}]" for word in list(FUNDUS_WORDS)[1:])

#: Settings of config files and the Python API only: lists of numbers (``mean``/``std``), and
#: switches the commands set themselves (``progress``, ``synthetic``, ``channels_last``).
NOT_ON_COMMAND_LINE = frozenset({"mean", "std", "channels_last", "progress", "synthetic"})
#: Flags not spelled ``--`` + the setting's name with dashes (``--no-NAME`` for a switch that is
#: on by default is derived).
FLAG_NAMES = {"num_workers": "--workers"}
#: Placeholders of flags whose unit does not name their value.
METAVARS = {"positive_class": "NAME", "augment": "LIST", "ema": "DECAY", "mixstyle": "P"}
#: The syntax of flags whose value is not a plain number or word, shown before their help.
SYNTAX = {"fundus": FUNDUS_HELP}
#: Markers around the generated table in docs/configuration.md.
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def fundus_options(value: str) -> dict[str, Any]:
    """``--fundus none|crop[,mask][,colour-std][,clahe][,ben-graham]`` -> FundusOptions fields.

    Parameters
    ----------
    value : str
        Comma-separated words of :data:`FUNDUS_WORDS` (``color`` spelling accepted), or ``none``.

    Returns
    -------
    dict
        Every :class:`medtune.data.fundus.FundusOptions` switch, True where named.

    Raises
    ------
    argparse.ArgumentTypeError
        For an unknown word (argparse prints it as a one-line usage error).
    """
    parts = {p.strip().replace("color", "colour") for p in value.split(",") if p.strip()}
    allowed = {"none", *FUNDUS_WORDS}
    if not parts <= allowed:
        raise argparse.ArgumentTypeError(
            f"unknown --fundus option(s) {sorted(parts - allowed)}; use {sorted(allowed)}"
        )
    return {field: word in parts for word, field in FUNDUS_WORDS.items()}


def augment_names(value: str) -> list[str]:
    """``--augment colour,blur`` -> the augmentation names it stands for.

    Parameters
    ----------
    value : str
        Comma-separated names or groups of :mod:`medtune.data.site_augment`, or ``none``.

    Returns
    -------
    list of str
        The augmentations, in application order (empty for none).

    Raises
    ------
    argparse.ArgumentTypeError
        For an unknown name (the message lists the known ones).
    """
    from medtune.data.site_augment import resolve_augment
    from medtune.errors import MedtuneError

    try:
        return list(resolve_augment(value))
    except MedtuneError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _devices(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _weights(value: str) -> str | None:
    return None if value == "none" else value


#: How a flag's text becomes the setting's value where the field's type is not enough.
PARSERS: dict[str, Callable[[str], Any]] = {
    "fundus": fundus_options,
    "augment": augment_names,
    "devices": _devices,
    "weights": _weights,
}


def _fields(names: Sequence[str] | None = None) -> list[dataclasses.Field[Any]]:
    """TrainConfig's fields on the command line (``names``, in that order, or all of them)."""
    by_name = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if names is not None:
        return [by_name[n] for n in names]
    return [f for f in by_name.values() if f.name not in NOT_ON_COMMAND_LINE]


def _is_switch(f: dataclasses.Field[Any]) -> bool:
    return f.default is True or f.default is False


def flag_name(f: dataclasses.Field[Any]) -> str | None:
    """The command-line flag of a setting.

    Parameters
    ----------
    f : dataclasses.Field
        A :class:`TrainConfig` field.

    Returns
    -------
    str or None
        ``--name-with-dashes``, ``--no-NAME`` for a switch that is on by default, the spelling of
        :data:`FLAG_NAMES`, or None for a setting of :data:`NOT_ON_COMMAND_LINE`.
    """
    if f.name in NOT_ON_COMMAND_LINE:
        return None
    dashed = f.name.replace("_", "-")
    return FLAG_NAMES.get(f.name) or (f"--no-{dashed}" if f.default is True else f"--{dashed}")


def flag_help(f: dataclasses.Field[Any]) -> str:
    """The ``--help`` text of a setting's flag.

    Parameters
    ----------
    f : dataclasses.Field
        A :class:`TrainConfig` field.

    Returns
    -------
    str
        Its help, flag syntax and default, without Markdown backticks, ``%`` escaped for argparse.
    """
    text = f.metadata["help"]
    if f.name in SYNTAX:
        text = f"{text}; as a flag: {SYNTAX[f.name]}"
    if f.default is True:
        text = f"turn off: {text} (on by default)"
    elif f.metadata.get("shown") == "required":
        text += " (required, here or in --config)"
    elif not _is_switch(f):
        text += f" (default: {default_words(f)})"
    return text.replace("`", "").replace("%", "%%")  # argparse %-formats help


def _flag_options(f: dataclasses.Field[Any], hint: Any) -> dict[str, Any]:
    """argparse ``add_argument`` options of one setting (never a default: see add_setting_flags)."""
    options: dict[str, Any] = {"dest": f.name, "help": flag_help(f)}
    if _is_switch(f):
        options["action"] = "store_false" if f.default else "store_true"
        return options
    if f.name == "data":  # once per site
        options["action"] = "append"
    elif f.name in PARSERS:
        options["type"] = PARSERS[f.name]
    else:
        scalar = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
        options["type"] = scalar[0] if scalar[0] in (int, float) else str
    if f.metadata.get("choices"):
        options["choices"] = list(f.metadata["choices"])
    metavar = METAVARS.get(f.name) or f.metadata.get("unit")
    if metavar and "choices" not in options:
        options["metavar"] = metavar.upper()
    return options


def add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """Add the flags of TrainConfig settings to a parser.

    A flag left out does not appear in the parsed namespace at all (``argparse.SUPPRESS``), so
    :func:`flag_settings` tells a flag given with the default's value from one not given.

    Parameters
    ----------
    parser : argparse.ArgumentParser
    names : sequence of str, optional
        The settings, in this order (default: every one not in :data:`NOT_ON_COMMAND_LINE`).
    """
    hints = typing.get_type_hints(TrainConfig)
    for f in _fields(names):
        parser.add_argument(
            flag_name(f), default=argparse.SUPPRESS, **_flag_options(f, hints[f.name])
        )


def flag_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig settings given on the command line.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed by a parser with :func:`add_setting_flags`.

    Returns
    -------
    dict
        Setting name -> value, for the flags given only (whatever their value).
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def _cell(f: dataclasses.Field[Any]) -> str:
    """The default column of the docs table: words as written, values as code."""
    words = default_words(f)
    if f.metadata.get("shown") or isinstance(f.default, (bool, int, float)) or words == "none":
        return words
    return f"`{words}`"


def _flag_cell(name: str, flag: str | None) -> str:
    if flag is None:
        return "(config file and Python only)"
    return f"`{flag}` (`{SYNTAX[name]}`)" if name in SYNTAX else f"`{flag}`"


def settings_table() -> str:
    """The Markdown table of every TrainConfig setting (``docs/configuration.md``).

    Returns
    -------
    str
        One row per field: name, flag, default, unit or allowed values, help.
    """
    rows = [
        "| setting | flag | default | unit or values | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in dataclasses.fields(TrainConfig):
        flag = flag_name(f)
        choices = f.metadata.get("choices")
        values = ", ".join(f"`{c}`" for c in choices) if choices else f.metadata.get("unit")
        cells = [
            f"`{f.name}`",
            _flag_cell(f.name, flag),
            _cell(f),
            values or "",
            f.metadata["help"],
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def with_settings_table(document: str) -> str:
    """``document`` with the text between its settings markers replaced by the current table.

    Parameters
    ----------
    document : str
        Markdown holding :data:`BEGIN` ... :data:`END`.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        When the markers are missing.
    """
    block = (
        f"{BEGIN}\n<!-- generated from medtune.config.TrainConfig by `make docs`; edit the "
        f"fields, not this table -->\n{settings_table()}\n{END}"
    )
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(document):
        raise ValueError(f"no {BEGIN} ... {END} block to fill")
    return pattern.sub(lambda _: block, document)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medtune.cli.settings DOC.md [--check]``: rewrite (or check) DOC's table.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0, or 1 with ``--check`` when the table is out of date.
    """
    parser = argparse.ArgumentParser(prog="python -m medtune.cli.settings")
    parser.add_argument("doc", type=Path, help="a Markdown file with the settings markers")
    parser.add_argument("--check", action="store_true", help="exit 1 if it is out of date")
    args = parser.parse_args(argv)
    text = args.doc.read_text(encoding="utf-8")
    current = with_settings_table(text)
    if args.check:
        stale = current != text
        if stale:
            print(f"{args.doc}: settings table out of date; run make docs", file=sys.stderr)
        return int(stale)
    if current != text:
        from medtune.io import write_text

        write_text(args.doc, current)
    return 0


if __name__ == "__main__":
    sys.exit(main())
