"""Create the fleet's Ed25519 signing key pair on the controller, once, with the agent's own code.

    python3 fleet_keygen.py SOURCE_DIR KEY_DIR

Runs on the controller (roles/edge_agent/tasks/fleet_key.yml) with Ansible's Python, which has
``cryptography`` (ansible-core requires it) but not necessarily the agent's other dependencies:
``agent.fleet.signing`` needs nothing else, so it is imported from the checkout (SOURCE_DIR) and
writes exactly what ``edge-agent fleet keygen --out KEY_DIR`` writes: fleet_key.pem (0600) and
fleet_pubkey.pem. KEY_DIR is created 0700. An existing pair is never replaced (exit 0, nothing done).
Prints JSON: {"created": bool, "private_key": path, "public_key": path}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(source: str, key_dir: str) -> int:
    sys.path.insert(0, source)
    from agent.fleet.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, write_keypair  # noqa: PLC0415

    out = Path(key_dir)
    private, public = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    created = False
    if not public.exists():
        if private.exists():
            print(f"{private} exists without {public}: restore the public key, or move the private key away "
                  "to create a new pair (devices with the old public key would then refuse the new signatures)",
                  file=sys.stderr)
            return 1
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        write_keypair(out)
        created = True
    print(json.dumps({"created": created, "private_key": str(private), "public_key": str(public)}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
