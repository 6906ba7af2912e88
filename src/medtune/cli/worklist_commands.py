"""``medtune users`` and ``medtune worklist``: argparse over :mod:`medtune.workflows.worklist`."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import sys

from medtune.config import ROLES
from medtune.errors import MedtuneError

DB_HELP = "worklist database URL (default SQLite in the data folder; postgresql://user:pw@host/db)"
DIR_HELP = "data folder (default $MEDTUNE_DATA or the user's data folder)"


def add_db_flags(p: argparse.ArgumentParser) -> None:
    """``--db`` and ``--data-dir``, shared by ``serve``, ``users`` and ``worklist``."""
    p.add_argument("--db", help=DB_HELP)
    p.add_argument("--data-dir", help=DIR_HELP)


def add_users(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="add a user (asks for the password)")
    add.add_argument("username")
    add.add_argument("--role", choices=ROLES, default="grader", help="graders screen and review")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    delete = sub.add_parser("delete", help="delete a user (their sessions and tokens end)")
    delete.add_argument("username")
    sub.add_parser("list", help="list the users")
    token = sub.add_parser("token", help="print a new API token for scripts (shown once)")
    token.add_argument("username")
    token.add_argument("--label", default="", help="what the token is for")
    for action in (add, delete, sub.choices["list"], token):
        add_db_flags(action)


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"password for {args.username}: ")
    if getpass.getpass("again: ") != first:
        raise MedtuneError("the passwords differ; run the command again")
    return first


def run_users(args: argparse.Namespace) -> None:
    from medtune.workflows import worklist

    where = {"db": args.db, "folder": args.data_dir}
    if args.action == "add":
        worklist.add_user(args.username, _password(args), args.role, **where)
        print(f"added {args.role} {args.username}")
    elif args.action == "delete":
        worklist.delete_user(args.username, **where)
        print(f"deleted {args.username}")
    elif args.action == "list":
        for user in worklist.list_users(**where):
            print(f"{user['username']}\t{user['role']}\t{user['created']}")
    else:
        print(worklist.new_token(args.username, args.label, **where))


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; use YYYY-MM-DD") from None


def add_worklist(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = sub.add_parser(
        "export",
        help="write the worklist as CSV, or with --reviewed the graders' grades as a labelled set",
    )
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument(
        "--reviewed",
        action="store_true",
        help="OUT/labels.csv + OUT/images/ of the reviewed photographs, which train --data and "
        "adapt --labels read (needs serve --keep-images)",
    )
    export.add_argument("--since", type=_date, help="first UTC day (YYYY-MM-DD) of the CSV")
    export.add_argument("--until", type=_date, help="last UTC day (YYYY-MM-DD) of the CSV")
    add_db_flags(export)


def run_worklist(args: argparse.Namespace) -> None:
    from medtune.workflows.worklist import export_worklist

    done = export_worklist(
        args.out,
        reviewed=args.reviewed,
        since=args.since,
        until=args.until,
        db=args.db,
        folder=args.data_dir,
    )
    print(f"wrote {done['path']} ({done['count']} lines)")
