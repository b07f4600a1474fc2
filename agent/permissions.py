"""Explain a refused file in one line: which path, which directory or file blocks it, and the fix.

A device has three kinds of files an operator may trip over: the provisioned config
(``/etc/edge-agent``, ``root:edge-agent`` 0750/0640, readable by the operator group), the service's
state (``/var/lib/edge-agent``, the service user's, 0700) and the Hugging Face cache inside it. The
fix differs (join the group, or run as root / the service user), so the hint is derived from the
blocking entry's owner, group and mode rather than from a fixed path list.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from pathlib import Path
from typing import Literal

from agent.errors import PermissionDeniedError

OPERATOR_GROUP = "edge-agent"
"""The documented operator group: members may read /etc/edge-agent (docs/deploy.md)."""

Action = Literal["read", "write", "access"]

_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def is_denied(exc: BaseException) -> bool:
    """True for an OS error that means "not allowed" (permission, or a read-only file system)."""
    return isinstance(exc, OSError) and exc.errno in _DENIED


def denied(path: Path | str, action: Action = "read", cause: OSError | None = None) -> PermissionDeniedError:
    """The error to raise when ``path`` could not be read or written: one line naming the path and the fix."""
    path = Path(path)
    if cause is not None and cause.errno == errno.EROFS:
        reason = "read-only file system (under the systemd unit only /var/lib/edge-agent is writable)"
        return PermissionDeniedError(f"cannot {action} {path}: {reason}", path=str(path))
    return PermissionDeniedError(f"cannot {action} {path}: permission denied ({hint(path, action)})", path=str(path))


def hint(path: Path, action: Action = "read") -> str:
    """What to do about it, judged from the first directory or file on the way that refuses this user."""
    blocker, bit = _blocker(path, action)
    try:
        st = os.stat(blocker)
    except OSError:
        return f"run with sudo, or ask for {action} access to {blocker}"
    owner, group = _user_name(st.st_uid), _group_name(st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    where = "" if blocker == path else f"{blocker} is {owner}:{group} {mode:04o}; "
    if mode & bit and st.st_gid not in os.getgroups() and st.st_gid != os.getegid():
        if _listed_member(group):
            return f"{where}you were added to group {group} but this session predates it: log in again"
        return f"{where}add yourself to group {group}: sudo usermod -aG {group} $USER, then log in again"
    if owner == "root":
        return f"{where}only root may {action} it: run with sudo"
    return f"{where}it belongs to {owner}: run with sudo, or as that user (sudo -u {owner} edge-agent ...)"


def _blocker(path: Path, action: Action) -> tuple[Path, int]:
    """The entry that refuses access and the group permission bit that would grant it."""
    path = Path(os.path.abspath(path))
    for directory in reversed(path.parents):
        if not os.path.exists(directory):
            break
        if not os.access(directory, os.X_OK):
            return directory, stat.S_IXGRP
    if action == "write" and not os.path.exists(path):
        return path.parent, stat.S_IWGRP
    return path, stat.S_IWGRP if action == "write" else stat.S_IRGRP


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _listed_member(group: str) -> bool:
    """Whether the group database lists this user (a supplementary group not active until the next login)."""
    try:
        members = grp.getgrnam(group).gr_mem
        me = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return False
    return me in members
