"""Writers own their folder: a lock, unique temporary names, fsync before rename, foreign folders refused.

Every omnilab writer (`write_json`, `extract`, `trace`) goes through here:

- `OutDir(path, marker=..., owns=...)`: takes an exclusive lock on `path/.omnilab.lock` (fcntl, non-blocking;
  released when the process ends, SIGKILL included). A second writer gets `FolderBusy`, one line naming the
  folder (exit 2). A folder that is not empty and holds none of `owns` is refused (`ForeignFolder`) before
  anything is written into it.
- `temp_path(path)`: a temporary name unique to this process and call, `.NAME.omnilab-tmp-PID-RANDOM`, beside
  the final name. Only names of this pattern are ever removed by clean-up (`remove_own_temporaries`), and only
  while the lock is held: a file someone else left there is never deleted.
- `atomic_write(path, data)` / `commit(tmp, path)`: write, fsync the file, rename, fsync the folder.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

LOCK_NAME = ".omnilab.lock"
TEMP_TAG = ".omnilab-tmp-"


class FolderBusy(ValueError):
    """Another omnilab process writes into this folder now."""


class ForeignFolder(ValueError):
    """The folder holds files omnilab did not write; nothing is written into it."""


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside `path`, unique to this process and this call."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def is_temp(name: str) -> bool:
    return TEMP_TAG in name


def fsync_dir(folder: str | os.PathLike) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, path: str | os.PathLike, *, fsync_file: bool = True) -> None:
    """fsync `tmp` (unless the caller did), rename it to `path`, fsync the folder."""
    if fsync_file:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` through a unique temporary name: fsync, rename. A failure leaves no temporary."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while len(view):
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        commit(tmp, path, fsync_file=False)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_own_temporaries(folder: str | os.PathLike) -> int:
    """Remove temporaries of earlier omnilab runs (names made by `temp_path`) under `folder`; call only while
    holding the folder's lock. Nothing else is touched."""
    n = 0
    for p in Path(folder).rglob(f"*{TEMP_TAG}*"):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            n += 1
    return n


def only_own_leftovers(folder: str | os.PathLike) -> bool:
    """True when everything under `folder` is a folder, the lock or an omnilab temporary (an interrupted run)."""
    return all(p.is_dir() and not p.is_symlink() or p.name == LOCK_NAME or is_temp(p.name)
               for p in Path(folder).rglob("*"))


class OutDir:
    """An output folder held by this process: `with OutDir(out, owns=("manifest.json",)) as d: ...`.

    owns: names whose presence marks the folder as written by this writer (a finished or interrupted run);
    a non-empty folder without any of them is refused. what: the verb, for the messages."""

    def __init__(self, path: str | os.PathLike, *, owns: tuple[str, ...] = (), what: str = "omnilab"):
        self.path, self.owns, self.what = Path(path), owns, what
        self._fd: int | None = None

    def acquire(self) -> "OutDir":
        import fcntl

        path = self.path
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path}: exists and is not a folder")
        if path.is_symlink():
            raise ValueError(f"{path}: is a symlink; give the folder itself")
        if path.is_dir() and not (path / LOCK_NAME).exists():  # never create the lock in a foreign folder
            self.check_not_foreign()
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderBusy(f"{path}: another omnilab process is writing into this folder now "
                                 f"({LOCK_NAME} is locked); wait for it to finish") from None
            raise
        self._fd = fd
        try:
            self.check_not_foreign()  # again, holding the lock: what another writer left is now settled
        except BaseException:
            self.release()
            raise
        return self

    def check_not_foreign(self) -> None:
        if not self.owns or any((self.path / n).exists() for n in self.owns) or only_own_leftovers(self.path):
            return
        entries = [p.name for p in self.path.iterdir() if p.name != LOCK_NAME]
        if entries:
            raise ForeignFolder(f"{self.path}: not empty and not written by omnilab {self.what} (no "
                                f"{' or '.join(self.owns)}; it holds {sorted(entries)[0]!r}, ...); "
                                f"give a new or empty folder")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "OutDir":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
