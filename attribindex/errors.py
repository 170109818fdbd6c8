"""The one exception type users catch: every message states the cause and the fix.

Running out of a resource (disk space, permission, memory) is a cause the user can fix too: `resource_failures`
turns the many shapes it takes (an `OSError` with an errno, numpy's short write, a safetensors or FAISS error
whose text carries the OS's, torch's allocator failure) into the same kind of one-line message.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


class AttribIndexError(Exception):
    """A problem the user can fix (bad input, bad config, mismatched index).

    The CLI prints these as one clean message without a traceback.

    Example:
        >>> raise AttribIndexError("k must be >= 1, got 0. Pass -k 10 or another positive number.")
        Traceback (most recent call last):
        ...
        attribindex.errors.AttribIndexError: k must be >= 1, got 0. ...
    """


class IndexMismatchError(AttribIndexError):
    """A query or shard was produced with a different model, projection or preconditioner."""


class ResourceError(AttribIndexError):
    """The machine ran out of something a command needs; once it is back, the same command carries on."""


class DiskFullError(ResourceError):
    """No space left on the device (or the disk quota) where a command writes."""


class PermissionDeniedError(ResourceError):
    """A file or folder may not be written (or read) by this user, or sits on a read-only file system."""


class OutOfMemoryError(ResourceError):
    """An allocation failed: host memory (MemoryError, torch's CPU allocator) or GPU memory."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
# What libraries that wrap the OS error say instead of raising OSError: safetensors (Rust) "... (os error 28)", FAISS
# "write error in PATH: 1048531 != 3200000 (No space left on device)".
_TEXT_ERRNO = {
    errno.ENOSPC: ("no space left on device", "os error 28"),
    errno.EDQUOT: ("disk quota exceeded", "os error 122"),
    errno.EACCES: ("permission denied", "os error 13"),
    errno.EPERM: ("operation not permitted", "os error 1)"),
    errno.EROFS: ("read-only file system", "os error 30"),
}
# numpy's np.save to a file handle raises a bare OSError("N requested and M written") on a short write, which for a
# regular file only a full disk causes.
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")
_OUT_OF_MEMORY = ("can't allocate memory", "cannot allocate memory", "out of memory", "std::bad_alloc")
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-\d+$")  # an atomic write's temporary name: report the file it becomes


@contextlib.contextmanager
def resource_failures(
    folder: str | Path, then: str | Callable[[], str], memory_fix: str = "close other programs", disk_hint: str = ""
) -> Iterator[None]:
    """Turn running out of disk space, permission or memory inside the block into a `ResourceError` saying what
    ran out, where, and to run the same command again once it is fixed (`then`: what that rerun does, or a function
    that says it at the time of the failure; `memory_fix`: how to need less memory; `disk_hint`: how to learn how
    much space the command needs).

    A pipeline stage (a build, a merge, a mutation) runs inside one of these; everything it writes is atomic, so
    what a failure leaves is either complete or named as unfinished, and the rerun resumes or starts over.

    Example:
        >>> with resource_failures("my-index", then="it resumes from its last written chunk"):  # doctest: +SKIP
        ...     build(...)  # a full disk raises DiskFullError("no space left on device while writing my-index ...")
    """
    try:
        yield
    except AttribIndexError:
        raise
    except Exception as err:  # MemoryError, OSError, and the RuntimeErrors of torch, FAISS and safetensors
        translated = resource_error(err, Path(folder), then if isinstance(then, str) else then(), memory_fix, disk_hint)
        if translated is None:
            raise
        raise translated from err


def resource_error(
    err: BaseException, folder: Path, then: str, memory_fix: str = "close other programs", disk_hint: str = ""
) -> ResourceError | None:
    """The `ResourceError` that `err` amounts to, or None when it is not about a resource."""
    if _is_out_of_memory(err):
        where = "GPU memory" if any(word in str(err).lower() for word in ("cuda", "gpu")) else "memory"
        requested = _requested(err)
        return OutOfMemoryError(
            f"out of {where}{f' (an allocation of {requested} failed)' if requested else ''}. "
            f"{memory_fix[:1].upper()}{memory_fix[1:]}, then run the same command again; {then}."
        )
    code = _errno(err)
    if code in _NO_SPACE:
        free = _free_space(folder)
        quota = " (disk quota exceeded)" if code == errno.EDQUOT else ""
        return DiskFullError(
            f"no space left on device while writing {folder}{quota}{f' ({free} free there)' if free else ''}. "
            f"Free space there{disk_hint} and run the same command again; {then}."
        )
    if code in _DENIED:
        path = _reported_path(err, folder)
        if code == errno.EROFS:
            return PermissionDeniedError(
                f"{path} is on a read-only file system. Make it writable (or choose a folder elsewhere) and run the "
                f"same command again; {then}."
            )
        return PermissionDeniedError(
            f"permission denied on {path}. Let this user read and write there (or choose a folder elsewhere) and run "
            f"the same command again; {then}."
        )
    return None


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError: CUDA
        return True
    if isinstance(err, OSError) and err.errno == errno.ENOMEM:  # mmap, fork
        return True
    return isinstance(err, RuntimeError) and any(text in str(err).lower() for text in _OUT_OF_MEMORY)


def _errno(err: BaseException) -> int | None:
    """The OS error behind `err`: its errno, or one named in the text of a library that wraps it."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    if isinstance(err, OSError) and _SHORT_WRITE.match(str(err)):
        return errno.ENOSPC
    if not isinstance(err, OSError) and not isinstance(err, RuntimeError) and type(err).__name__ != "SafetensorError":
        return None
    text = str(err).lower()
    return next((code for code, phrases in _TEXT_ERRNO.items() if any(p in text for p in phrases)), None)


def _reported_path(err: BaseException, folder: Path) -> Path:
    """The file the OS named (as the file an atomic write's temporary becomes), else the folder being written."""
    filename = getattr(err, "filename", None)
    if not filename:
        return folder
    path = Path(filename)
    temporary = _TEMPORARY.match(path.name)
    return path.with_name(temporary["name"]) if temporary else path


def _free_space(folder: Path) -> str | None:
    """Free space on the file system of `folder` (or its nearest existing parent), e.g. ``12.0 MiB``."""
    for place in (folder, *folder.absolute().parents):
        if place.exists():
            try:
                return _size(shutil.disk_usage(place).free)
            except OSError:
                return None
    return None


_ALLOCATION = re.compile(r"allocate (?P<amount>[\d.]+) ?(?P<unit>bytes|[KMGTP]iB)", re.IGNORECASE)
_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")


def _requested(err: BaseException) -> str | None:
    """How much the failed allocation asked for, as torch (`tried to allocate 123 bytes`, `Tried to allocate 2.00
    GiB`) or numpy (`Unable to allocate 9.09 TiB`) say it; None when they do not."""
    found = _ALLOCATION.search(str(err))
    if found is None:
        return None
    unit = next(i for i, name in enumerate(_UNITS) if name.lower() == found["unit"].lower())
    return _size(float(found["amount"]) * 1024**unit)


def _size(count: float) -> str:
    """A byte count for people: ``812 bytes``, ``12.0 MiB``."""
    unit = 0
    while count >= 1024 and unit < len(_UNITS) - 1:
        count, unit = count / 1024, unit + 1
    return f"{count:.0f} bytes" if unit == 0 else f"{count:.1f} {_UNITS[unit]}"
