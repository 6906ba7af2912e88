"""``medtune`` command line: a thin layer over the Python API (one function per command)."""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence

from medtune import logs
from medtune.errors import (
    MedtuneError,
    offer,
    render,
    set_command_options,
    unpickling_detail,
)
from medtune.version import __version__

EXIT_USER_ERROR = 2
VERBOSE_HELP = (
    "also show progress messages, the libraries' messages (Lightning) and library warnings; "
    "without it only medtune's progress bars, results and errors are printed"
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USER_ERROR
    # error advice names this command's options only (popped: handlers never see it)
    set_command_options(vars(args).pop("command_options", None))
    try:
        return args.handler(args) or 0
    except MedtuneError as err:
        if args.debug:
            raise
        _end_progress_bars()
        print(f"medtune: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (OSError, pickle.UnpicklingError) as err:
        message = _environment_error(err)
        if message is None or args.debug:
            raise
        _end_progress_bars()
        print(f"medtune: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _end_progress_bars()
        advice = render("rerun the same command" + offer(" (with {})", "--resume"))
        print(f"medtune: interrupted; {advice} to continue", file=sys.stderr)
        return 130
    finally:
        set_command_options(None)


def _end_progress_bars() -> None:
    """Close the progress bars an error interrupted, so that the error is a line of its own and
    the last one (an open bar would be redrawn after it, or the error printed into its line)."""
    from tqdm import tqdm  # tqdm.auto's bars are instances of this class too

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def _environment_error(err: BaseException) -> str | None:
    """One line for a full disk, an unwritable folder or a refused pickle; ``None`` otherwise."""
    if isinstance(err, pickle.UnpicklingError):
        detail = unpickling_detail(err)
        return (
            "refused to load a checkpoint or weights file: it holds Python objects other than "
            f"tensors, which could run code ({detail}); use files written by medtune, plain "
            "state dicts or .safetensors"
        )
    if isinstance(err, OSError):
        from medtune.io import storage_error

        where = err.filename if err.filename is not None else "an output file"
        found = storage_error(where, err)
        return None if found is None else str(found)
    return None


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that states every option's default.

    An option whose help does not mention its default gets ``(default: X)``, X being the argparse
    default. Switches (store_true / store_false) and options without a default are left alone;
    the settings flags of ``medtune train`` state their TrainConfig default in their own help
    (:func:`medtune.cli.settings.flag_help`).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text.lower():
            return text
        if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
            return text
        value = action.default
        if value is None or value is False or value in ("", argparse.SUPPRESS):
            return text
        if isinstance(value, dict):  # --fundus: its help states the default in words
            return text
        shown = str(value).replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune",
        description="Transfer learning and fine-tuning of ImageNet-pretrained CNNs on medical "
        "images (diabetic retinopathy grading first).",
    )
    parser.add_argument("--version", action="version", version=f"medtune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    from medtune.cli import commands

    for name, (help_text, add_args, handler) in commands.COMMANDS.items():
        cmd = sub.add_parser(
            name,
            help=help_text.replace("%", "%%"),  # argparse %-formats help=, not description=
            description=help_text,
            formatter_class=DefaultsHelpFormatter,
        )
        # Accept the global flags after the command too (SUPPRESS keeps a flag given before it).
        cmd.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks on errors",
        )
        cmd.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help=VERBOSE_HELP,
        )
        add_args(cmd)
        options = [o for action in cmd._actions for o in action.option_strings]
        cmd.set_defaults(handler=handler, command_options=options)
    return parser


if __name__ == "__main__":
    sys.exit(main())
