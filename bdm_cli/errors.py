"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (files, options, config): exit code 1 unless a usage error."""

    exit_code = 1


class UsageError(UserError):
    """A bad command-line value (exit code 2, like Click's usage errors)."""

    exit_code = 2
