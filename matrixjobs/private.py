"""Files and directories only the service user may read, whatever the umask.

The SQLite store holds the bot's access token and the crypto store its private keys: run
from a shell (umask 022) they would be created readable by everyone. Files are created
0600 and directories 0700; existing ones are tightened. Only directories we create are
made 0700: an existing parent (/var, $HOME) is not ours to change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
log = logging.getLogger(__name__)

# Group and other bits: any of them set means others may read (or search) it.
SHARED_BITS = 0o077


def make_dirs(path: Path) -> None:
    """Create `path` and its missing parents with mode 0700; leave existing ones alone."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # someone else's since: not ours to chmod
            directory.mkdir(mode=DIR_MODE)
            os.chmod(directory, DIR_MODE)  # mkdir's mode went through the umask


def private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if it is missing, else tighten it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        if path.is_file():  # anything else is not ours to change: opening it fails later
            tighten(path)
        return
    try:
        os.fchmod(fd, FILE_MODE)  # an odd umask (0277) may have taken the owner's bits too
    finally:
        os.close(fd)


def tighten(path: Path) -> None:
    """Take the group and other bits off an existing file or directory (one an older
    version made, or a copy restored from a backup), and say so."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & SHARED_BITS:
        os.chmod(path, mode & ~SHARED_BITS)
        log.warning("%s was readable by others (mode %o): made it %o", path, mode,
                    mode & ~SHARED_BITS)


def shared(paths: list[Path]) -> list[tuple[Path, int]]:
    """The paths that exist and that group or others may read, with their modes."""
    found = []
    for path in paths:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue
        if mode & SHARED_BITS:
            found.append((path, mode))
    return found
