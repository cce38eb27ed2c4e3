"""The one writer for the files batchgen produces from its state (export, provenance index, report).

`local.write_atomic` writes an image that is already in memory. An export of 100,000 rows should not be:
it is written row by row into a hidden temporary file beside the target, fsynced, and renamed over the
target with `os.replace` — so a reader (a shop import polling the folder, a person opening the report)
sees the previous complete file or the new complete file, never half of one, even if we are killed. On
any error the temporary file is removed and the old file stays.

A user names these files (`-o`), so the target is whatever the user pointed at, and a rename would replace
it rather than write to it:

- a symlink is followed: the file it points to is replaced atomically and the link stays;
- a target that exists and is not a regular file (a FIFO, `/dev/stdout`, `/dev/null`) is opened and
  written straight into — it has no folder of its own to hold a temporary file, and renaming over a
  device node would destroy it;
- one of this process's own descriptors (`/dev/stdout`, `/dev/stderr`, `/dev/fd/N`, `/proc/self/fd/N`)
  is written into as it is, even when it is a regular file (`... -o /dev/stdout >> log`): replacing the
  file it names would drop what it held, and reopening it would truncate it.

Errors come out as ours, without a traceback: a target that cannot be created (its parent is a file, a
folder that takes no files such as /proc, no permission, read-only) is the user's argument (ConfigError,
exit 2); a write that fails once the file is open (no space left, an I/O error) is a fault of this machine
(LocalFaultError, exit 3), as for the images.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from batchgen.errors import ConfigError, LocalFaultError, describe_os_error

# Errors that say the machine is short of something, not that the path is wrong: a fault even at creation.
_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


_OWN_FD = re.compile(r"/(?:dev/fd|proc/self/fd)/(\d+)")
_STD_STREAMS = {"/dev/stdout": 1, "/dev/stderr": 2}


def own_descriptor(target: Path | str) -> int | None:
    """The descriptor of this process that `target` names (`/dev/stdout` is 1), if it names one."""
    text = str(target)
    if text in _STD_STREAMS:
        return _STD_STREAMS[text]
    found = _OWN_FD.fullmatch(text)
    return int(found.group(1)) if found else None


def is_special(target: Path | str) -> bool:
    """Whether `target` is written straight into: one of our own descriptors, or a path that exists (links
    followed) and is not a regular file (a FIFO, a device, a socket)."""
    if own_descriptor(target) is not None:
        return True
    try:
        return not stat.S_ISREG(os.stat(target).st_mode)
    except OSError:
        return False


def open_output(target: Path | str, *, newline: str | None = None,
                what: str = "cannot write") -> contextlib.AbstractContextManager[IO[str]]:
    """Open a UTF-8 text stream for `target`: a regular file (or a new one) is replaced only when the block
    ends without error; a FIFO or device is written straight into (module docstring).

    `what` starts the error messages ("cannot write the export"); they name `target` as given."""
    target = Path(target)
    fd = own_descriptor(target)
    if fd is not None:
        try:
            return _into(os.fdopen(os.dup(fd), "w", encoding="utf-8", newline=newline), target, what)
        except OSError as error:  # EBADF: that descriptor is not open
            raise ConfigError(f"{what} {target}: {describe_os_error(error)}") from None
    try:
        special = not stat.S_ISREG(os.stat(target).st_mode)
    except FileNotFoundError:
        special = False  # a new file (or a link to one): it is created where it will live
    except OSError as error:  # ENOTDIR (a parent is a file), ELOOP, EACCES
        raise _create_error(what, target, target, error) from None
    if special:
        try:
            return _into(open(target, "w", encoding="utf-8", newline=newline), target, what)
        except OSError as error:
            raise _create_error(what, target, target, error) from None
    # A link is replaced at the file it points to; `os.replace` over the link itself would swap the link
    # for a regular file and leave the linked file as it was.
    real = Path(os.path.realpath(target)) if target.is_symlink() else target
    return _replacing(real, target, newline, what)


@contextlib.contextmanager
def _into(fh: IO[str], target: Path, what: str) -> Iterator[IO[str]]:
    """Write straight into an opened pipe, device or descriptor; a failed write (ENOSPC from /dev/full, EPIPE
    from a reader that went away) is a fault of this machine."""
    try:
        with fh:
            yield fh
            fh.flush()
    except OSError as error:
        raise LocalFaultError(what, str(target), error) from None


@contextlib.contextmanager
def _replacing(real: Path, shown: Path, newline: str | None, what: str) -> Iterator[IO[str]]:
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".part")
    except OSError as error:
        raise _create_error(what, shown, real, error) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are meant to be shared like the images
        os.replace(tmp, real)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise LocalFaultError(what, str(shown), error) from None
        raise


def _create_error(what: str, shown: Path, real: Path, error: OSError) -> ConfigError | LocalFaultError:
    """Why `real` (the file `shown` names) cannot be created, in a sentence: the user's argument (exit 2)
    unless the disk is full."""
    if error.errno in _FAULTS:
        return LocalFaultError(what, str(shown), error)
    # os.path's checks answer False where Path's raise (a parent we may not search)
    blocking = next((p for p in real.parents if os.path.exists(p) and not os.path.isdir(p)), None)
    if blocking is not None:
        cause = f"{blocking} is a file, not a folder"
    elif error.errno == errno.EISDIR:
        cause = "it is a folder"
    elif error.errno == errno.ENOENT and os.path.isdir(real.parent):
        cause = f"{real.parent} does not accept new files"  # /proc, /sys: a listing, not a folder
    else:
        cause = describe_os_error(error)
    return ConfigError(f"{what} {shown}: {cause}")
