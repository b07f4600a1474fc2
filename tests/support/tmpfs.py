"""Small tmpfs mounts for disk-full tests: a directory whose free space the test decides.

Not in a private mount namespace: the daemon subprocess, the CLI and a second start of the daemon must all
see the same files (a partial download that survives a restart), so the mount is a plain one on a
directory inside pytest's tmp dir, and :func:`small_tmpfs` always unmounts it (lazily if something still
holds it), also when the test fails. Root only; :func:`tmpfs_unavailable` says why not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def tmpfs_unavailable() -> str | None:
    """Why tmpfs cannot be mounted here (a skip reason), or None when it can."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount/umount are not installed"
    return None


@dataclass
class Tmpfs:
    """A mounted tmpfs: grow or shrink it with :meth:`resize`, fill it with :meth:`fill`."""

    path: Path

    def resize(self, size_bytes: int) -> None:
        """Remount with a new size; the files stay (tmpfs refuses a size below what is in use)."""
        _run("mount", "-o", f"remount,size={size_bytes}", str(self.path))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    def fill(self, name: str = "filler.bin") -> Path:
        """Write a file until the filesystem is full (ENOSPC); returns it (delete it to free the space)."""
        filler = self.path / name
        chunk = b"\0" * 65536
        with filler.open("ab", buffering=0) as f:
            while True:
                try:
                    written = f.write(chunk)
                except OSError:
                    break
                if not written:
                    break
        # The page cache may still hold a partial page: top it up byte by byte.
        with filler.open("ab", buffering=0) as f, contextlib.suppress(OSError):
            while f.write(b"\0"):
                pass
        return filler


@contextlib.contextmanager
def small_tmpfs(path: Path, size_bytes: int) -> Iterator[Tmpfs]:
    """Mount a tmpfs of ``size_bytes`` on ``path`` (created) for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path))
    try:
        yield Tmpfs(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            # Something (a daemon the test could not stop) still holds a file: detach it anyway.
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
