"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback; and the record of a
Ctrl-C, which is how a stop is still seen when the KeyboardInterrupt itself was lost."""

import threading

# Set by the CLI's SIGINT handler, which then raises KeyboardInterrupt as Python's own does. That exception can be
# lost: raised inside an import that C code runs and clears (torch's start-up), the command went on, and a
# multi-process training then waited at its rendezvous for good. Long waits and the start of long work check it.
INTERRUPTED = threading.Event()


def raise_if_interrupted() -> None:
    """The stop a lost KeyboardInterrupt meant, raised now."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


class UserError(Exception):
    """A problem with the user's input (files, options, config): exit code 1 unless a usage error."""

    exit_code = 1


class AgreedError(UserError):
    """An error that every process of a torchrun group raises at once, from counters they agreed on (a non-finite
    loss, unreadable data): rank 0 reports it, the others only exit with its code (it was printed once per rank)."""


class UsageError(UserError):
    """A bad command-line value (exit code 2, like Click's usage errors)."""

    exit_code = 2
