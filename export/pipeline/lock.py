"""One build per artifact folder at a time.

A build holds an OS advisory lock on ``<out>/.build.lock`` from before it reads the folder (the
previous manifest, the leftovers it deletes) until its manifest is written and the files only the
old manifest named are deleted. The kernel drops the lock when the process ends, however it ends,
so a killed build never leaves a stale lock (its lock file may stay; the next build takes it over).

Inside the folder rather than beside it: the folder is the one place a build must be able to write
(its parent may be read-only, e.g. a mounted volume), and every build of the folder, whatever path
names it (relative, a symlink), meets the same file. The file is deleted while still locked when
the build ends, so a finished folder has no extra file; a build that waited on a deleted file sees
that it is no longer the folder's lock and takes the new one.

A second build waits by default, printing which process holds the folder: two CI jobs or two
terminals running the same command then both succeed, the second mostly reusing what the first
wrote, instead of one failing and being retried by hand. ``wait=False`` (``--no-wait``) refuses
at once in one line, for scripts that would rather fail fast.

A build that made the folder (or its parents) and fails removes them again, as long as they hold
nothing else: a failed build leaves no new folder.

Linux and macOS use ``fcntl.flock``. Windows (no ``fcntl``) locks one byte of the file with
``msvcrt.locking``, polling while it waits; there the file is not deleted while open.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from .errors import BuildError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

LOCK_NAME = ".build.lock"
_WINDOWS_LOCK_OFFSET = 1 << 20  # the byte locked on Windows: past the holder line, which stays readable
_WINDOWS_POLL_S = 0.5


class FolderBusyError(BuildError):
    """Another build holds the artifact folder (``--no-wait``)."""


def _holder_line() -> str:
    command = " ".join(shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]).split())
    command = command if len(command) <= 300 else command[:297] + "..."  # one line, whatever ran it
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}"


class BuildLock:
    """``with BuildLock(out):`` holds ``out`` for one build; see the module's docstring."""

    def __init__(self, out: Path, wait: bool = True, log: Callable[[str], object] = print):
        self.out, self.wait, self.log = Path(out), wait, log
        self.path = self.out / LOCK_NAME
        self.made: list[Path] = []  # folders this build created, outermost first
        self._fd: int | None = None

    # -- taking it ------------------------------------------------------------------------------

    def __enter__(self) -> BuildLock:
        announced = False
        while True:
            self._make_folder()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._try_lock(fd):
                    holder = self._holder(fd)
                    if not self.wait:
                        raise FolderBusyError(
                            f"{self.out} is being built by another build ({holder}); wait for it to finish, "
                            "or run without --no-wait to wait for it"
                        )
                    if not announced:
                        self.log(f"waiting for the build in progress in {self.out} to finish ({holder})")
                        announced = True
                    self._lock_blocking(fd)
            except BaseException:
                os.close(fd)
                raise
            if self._is_current(fd):
                break
            os.close(fd)  # the holder deleted that file (or the whole folder) before letting go: again
        self._fd = fd
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (_holder_line() + "\n").encode())
        return self

    def _make_folder(self) -> None:
        """Create ``out`` and missing parents one by one, remembering those this call made."""
        if self.out.is_dir():
            return
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:  # made meanwhile by someone else: not ours to remove
                continue
            self.made.append(folder)

    def _is_current(self, fd: int) -> bool:
        """Whether the file locked is still ``out/.build.lock`` (not deleted by the build before)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        then = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (then.st_dev, then.st_ino)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 4096)
        except OSError:
            text = b""
        line = text.decode("utf-8", "replace").strip()
        return line or "a process that has not yet written its name"

    @staticmethod
    def _try_lock(fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _lock_blocking(self, fd: int) -> None:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C interrupts the wait (KeyboardInterrupt)
            return
        while not self._try_lock(fd):
            time.sleep(_WINDOWS_POLL_S)

    # -- letting go -----------------------------------------------------------------------------

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release(failed=kind is not None)

    def release(self, failed: bool = False) -> None:
        """Delete the lock file (while still holding it), remove the folders this build made if it
        failed and they hold nothing else, and let go."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if fcntl is not None and self._is_current(fd):
                self.path.unlink()
            if failed and fcntl is not None:
                self._remove_made()
        finally:
            if fcntl is None:
                os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            os.close(fd)
        if failed and fcntl is None:
            self.path.unlink(missing_ok=True)
            self._remove_made()

    def _remove_made(self) -> None:
        """Remove the folders this build created, if empty but for empty folders; never a file."""
        if not self.made:
            return
        for root, folders, files in os.walk(self.out, topdown=False):
            for name in folders:
                try:
                    os.rmdir(os.path.join(root, name))
                except OSError:
                    pass
        for folder in (self.out, *self.out.parents):
            if folder not in self.made:
                break
            try:
                folder.rmdir()
            except OSError:  # something else is in it now: leave it
                return
