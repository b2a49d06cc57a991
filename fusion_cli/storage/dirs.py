"""Directories for the stores that live on disk (file: and sqlite:)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def make_private_dirs(directory: Path) -> None:
    """mkdir -p where every directory created is 0700: mkdir(parents=True) would give the
    parents the umask's mode (0777 under umask 0), and a writable parent lets anyone
    swap the session directory for their own."""
    if directory.is_dir():
        return
    if directory.parent != directory:
        make_private_dirs(directory.parent)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        if not directory.is_dir():  # a file in the way: say so, as mkdir -p does
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory)) from None
