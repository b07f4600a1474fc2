"""Pack the controller's wheelhouse into one tar for the devices, and describe the edge-agent wheel in it.

    python3 pack_wheelhouse.py WHEELHOUSE ARCHIVE EDGE_AGENT_WHEEL

Runs on the controller (roles/edge_agent/tasks/install.yml). One archive crosses the connection in
one transfer instead of one round trip per wheel, and only when it changed: its bytes depend on the
wheels alone (members sorted by name, fixed mtime, owner root, mode 0644), so its checksum is the same
on every run until a wheel changes. ARCHIVE is rewritten only when its content differs. Hidden files
(ARCHIVE itself among them) are left out.

Prints JSON: {"archive_changed": bool, "metadata": str, "record": str}, the last two being the
METADATA and RECORD of EDGE_AGENT_WHEEL, which the device compares with its venv.
"""

from __future__ import annotations

import filecmp
import json
import os
import sys
import tarfile
import tempfile
import zipfile

MTIME = 315532800  # 1980-01-01, the SOURCE_DATE_EPOCH the role builds the wheel with


def pack(house: str, archive: str) -> bool:
    """Write the archive of HOUSE's wheels to ARCHIVE unless it holds exactly that already; True if written."""
    names = sorted(n for n in os.listdir(house) if not n.startswith(".") and os.path.isfile(os.path.join(house, n)))
    fd, tmp = tempfile.mkstemp(prefix=".wheelhouse-", suffix=".tar.tmp", dir=os.path.dirname(archive))
    try:
        with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name in names:
                path = os.path.join(house, name)
                info = tarfile.TarInfo(name)
                info.size = os.path.getsize(path)
                info.mtime = MTIME
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                with open(path, "rb") as wheel:
                    tar.addfile(info, wheel)
        if os.path.isfile(archive) and filecmp.cmp(tmp, archive, shallow=False):
            return False
        os.chmod(tmp, 0o644)
        os.replace(tmp, archive)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def describe(wheel: str) -> dict[str, str]:
    """The METADATA and RECORD texts of a wheel."""
    with zipfile.ZipFile(wheel) as whl:
        info = next(n for n in whl.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        dist_info = info.rsplit("/", 1)[0]
        return {
            "metadata": whl.read(f"{dist_info}/METADATA").decode(),
            "record": whl.read(f"{dist_info}/RECORD").decode(),
        }


def main() -> None:
    house, archive, wheel = sys.argv[1:4]
    changed = pack(house, archive)
    print(json.dumps({"archive_changed": changed, **describe(wheel)}))


if __name__ == "__main__":
    main()
