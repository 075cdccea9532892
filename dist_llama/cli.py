"""How every command reports a user's mistake: one line `<command>: error: <message>` on stderr, exit 2.

A user's mistake (a bad option, a missing file, an unusable checkpoint or config) is one of the
exception types a command names; those end in that line. Anything else is a bug and keeps its
traceback. Usage errors from argparse follow the same convention through CommandParser.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

USER_ERROR = 2  # argparse's status for a bad command line; ours for every other user mistake
_ERROR_LINE = re.compile(r"[a-z][a-z_-]*: error: (?P<message>.*)")  # not "ValueError: error: ..."


def print_error(command: str, message: str, status: int = USER_ERROR) -> int:
    """Print the error line; returns status, for a main() that returns its exit status."""
    print(f"{command}: error: {message}", file=sys.stderr, flush=True)
    return status


def fail(command: str, message: str, status: int = USER_ERROR) -> NoReturn:
    sys.exit(print_error(command, message, status))


@contextmanager
def user_errors(command: str, *error_types: type[BaseException]) -> Iterator[None]:
    """Inside the block, the given exception types end the program with fail(command, str(error))."""
    try:
        yield
    except error_types as error:
        fail(command, str(error))


def error_message(line: str) -> str | None:
    """The message of a line that a command printed in this convention, else None."""
    match = _ERROR_LINE.match(line.strip())
    return match["message"] if match else None


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser for `python -m dist_llama.<command>` whose usage errors follow the convention."""

    def __init__(self, *args, command: str, **kwargs):
        kwargs.setdefault("prog", f"python -m dist_llama.{command}")
        super().__init__(*args, **kwargs)
        self.command = command

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", functools.partial(CommandParser, command=self.command))
        return super().add_subparsers(**kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        fail(self.command, message)
