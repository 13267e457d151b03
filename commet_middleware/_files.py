"""Files this toolkit creates are private to their user: 0600 files in 0700 directories."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence

__all__ = ["SQLITE_COMPANIONS", "prepare_private_file"]

_logger = logging.getLogger("commet_middleware")

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
# SQLite keeps a database's live state in files next to it, and creates them with the permission
# bits of the database file itself: a database that is 0600 before SQLite opens it gets 0600
# companions whatever the umask (tests/security/test_spool_permissions.py checks it).
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
# Names SQLite gives a database that has no file.
_NOT_A_FILE = ("", ":memory:")


def prepare_private_file(path: str, *, companions: Sequence[str] = ()) -> None:
    """Make sure ``path`` is a file only its owner can read, before another library opens it.

    A missing file is created empty with mode 0600 (and its missing parent directories with
    0700), whatever the umask. An existing file, or one of its ``companions`` (suffixes such as
    ``-wal``), that group or others may read or write, that belongs to another user, or a
    symbolic link at ``path``, is left as it is (the operator may share it on purpose), with one
    WARNING that names it and the fix.
    Never raises: a file that cannot be made here fails, with its own error, where it is opened.
    """
    if path in _NOT_A_FILE:
        return
    try:
        _make_parents(os.path.dirname(os.path.abspath(path)))
        if _create(path):
            return
        _check_existing(path, companions)
    except OSError as exc:
        _logger.warning("commet: could not prepare %r as a private file: %s", path, exc)


def _make_parents(directory: str) -> None:
    missing: list[str] = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for created in reversed(missing):
        try:
            os.mkdir(created, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # another process made it first: theirs, with their mode
        # The umask can only take bits away, but a umask of 0o700 would leave us a directory
        # we cannot enter: set the mode we asked for.
        os.chmod(created, PRIVATE_DIR_MODE)


def _create(path: str) -> bool:
    # O_EXCL: only the process that creates the file sets its mode; O_NOFOLLOW: a symlink
    # planted at the path is not followed into someone else's file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, PRIVATE_FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # exactly 0600, whatever the umask left
    finally:
        os.close(fd)
    return True


def _check_existing(path: str, companions: Sequence[str]) -> None:
    problems: list[str] = []
    if os.path.islink(path):
        # SQLite follows it: the data goes wherever whoever made the link chose.
        problems.append(f"{path} is a symbolic link to {os.readlink(path)}")
    for name in (path, *(path + suffix for suffix in companions)):
        try:
            info = os.stat(name)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            problems.append(f"{name} is {mode:04o}")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            problems.append(f"{name} belongs to uid {info.st_uid}")
    if problems:
        _logger.warning(
            "commet: %s: other local users may read or change the billing data in it (customer "
            "ids, features, usage); make it private with: chmod 600 %s*",
            "; ".join(problems),
            path,
        )
