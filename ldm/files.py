"""Files written whole or not at all, with the permissions a plain open() gives (0666 less the umask)."""
import errno
import os
import secrets
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, an exhausted quota (cluster home and scratch folders)


def atomic_write(path, write) -> Path:
    """write(tmp) to a temporary file beside `path`, fsync, then rename it over `path`: readers see the old file or
    the new one, never a part, and a failed write leaves no temporary behind (one killed mid-write leaves
    `.<name>.<hex>.tmp`). The temporary is created as open() creates files, so the umask (and a folder's default
    ACL) decides its mode; a writer that sets its own (safetensors: 0600) is undone. A failed write raises the
    OSError behind it (ENOSPC ...), naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
        mode = os.stat(tmp).st_mode & 0o7777
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            if os.fstat(fd).st_mode & 0o7777 != mode:
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = os_error(err)
        if cause is not None and cause.filename != str(path):  # the file meant, not its temporary
            raise type(cause)(cause.errno, cause.strerror or str(cause), str(path)) from err
        raise
    _fsync_folder(path.parent)  # the rename itself survives a crash (POSIX)
    return path


def os_error(err: BaseException):
    """The OSError (with an errno) that `err` is or arose from, or None: torch.save reports a failed write (a
    full disk) as a RuntimeError raised while handling the file object's OSError."""
    while err is not None:
        if isinstance(err, OSError) and err.errno:
            return err
        err = err.__cause__ or err.__context__
    return None


def disk_full(err: BaseException, folder=None):
    """"No space left on device: could not write PATH" where `err` is (or arose from) a full disk or an exhausted
    quota (FULL), else None: what train.py and every script say in one line instead of a traceback
    (ldm.cli.script_main); `folder` is named where the error names no file."""
    cause = os_error(err)
    if cause is None or cause.errno not in FULL:
        return None
    what = cause.filename or (f"a file under {folder}" if folder is not None else "a file")
    return f"{cause.strerror or os.strerror(cause.errno)}: could not write {what}"


def _fsync_folder(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path, text: str) -> Path:
    """`text` (UTF-8) written whole or not at all, as atomic_write writes."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
