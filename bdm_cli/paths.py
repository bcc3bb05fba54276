"""Paths as users type them: ``~`` expanded as a shell does, and the home and cache folders (no torch import: the CLI
parses its options with these before anything heavy loads)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import UserError

__all__ = ["user_path", "output_file", "home", "cache_home", "first_missing", "blocking_file", "not_a_folder", "remove_empty_folders"]


def user_path(text: str | Path) -> Path:
    """A path as typed, with a leading ``~`` or ``~user`` expanded as a shell does (``--out=~/x`` reaches bdm
    unexpanded). Anything else stays literal: ``./~x`` is the file ``~x`` here, and ``~name`` of no user is that
    name; an empty or unset HOME falls back to the account's home folder."""
    if isinstance(text, Path):  # a default, or a path bdm made: never expanded twice
        return text
    if not text.startswith("~"):
        return Path(text)
    head, sep, rest = text.partition("/")
    if head == "~":
        return Path(home()) / rest if rest else Path(home())
    expanded = os.path.expanduser(head)  # ~name: that user's home, or unchanged if there is none
    return Path(expanded + sep + rest)


def output_file(text: str | Path) -> Path:
    """A file to write, as typed (:func:`user_path`): a name ending in ``/`` means a folder, which ``Path`` would
    silently drop (``--out new.png/`` wrote the file new.png), so it is refused as cp and open() refuse it."""
    if isinstance(text, str) and not text.strip():
        raise ValueError("is empty (an unset shell variable?); give a file name")
    if isinstance(text, str) and text.rstrip().endswith(("/", os.sep, "/.")):
        raise ValueError(f"{text!r} ends with a slash (a folder); give a file name")
    name = os.path.basename(text) if isinstance(text, str) else ""
    if name in (".", ".."):  # "img.png/..": the folder holding img.png
        raise ValueError(f"{text!r} names a folder ({name}); give a file name")
    if name.startswith(".") and name.count(".") == 1 and len(name) > 1:  # ".png": Path reads a hidden file, no suffix
        raise ValueError(f"{text!r} has no name before its extension; give a file name such as x{name}")
    return user_path(text)


def home() -> Path:
    """The user's home folder: $HOME, or the account's entry where HOME is unset or empty (never the root folder)."""
    import pwd

    value = os.environ.get("HOME")
    if value:
        return Path(value)
    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        raise UserError("HOME is not set and this account has no home folder: set HOME") from None


def cache_home() -> Path:
    """Where bdm keeps downloads and caches by default: ``~/.cache/bdm``."""
    return home() / ".cache" / "bdm"


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what a ``mkdir -p`` would make), or None: what a
    command that fails removes again, so that it leaves nothing behind."""
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def blocking_file(path: Path) -> Path | None:
    """The file (or link to one) among ``path``'s folders that would stop a ``mkdir -p`` of it or a write into it
    (``--out afile/x.png``), or None: its own error names it, not a missing folder or the whole path."""
    for folder in Path(path).parents:
        if folder.exists() or folder.is_symlink():
            return None if folder.is_dir() else folder
    return None


def not_a_folder(path: Path) -> str:
    """What :func:`blocking_file` found, for an error message: a file, or a symbolic link that leads nowhere."""
    if path.is_symlink() and not path.exists():
        return f"{path} is a symbolic link to {os.readlink(path)}, which does not exist"
    return f"{path} is a file, not a directory"


def remove_empty_folders(path: Path, made: Path | None) -> None:
    """Remove ``path`` and the folders above it up to ``made`` (what :func:`first_missing` said a command would
    make), each only if it is empty: a failed command takes back its folders, never anyone's files."""
    if made is None or (path != made and made not in path.parents):
        return
    for folder in [path, *path.parents]:
        with contextlib.suppress(OSError):
            folder.rmdir()
        if folder == made:
            break
