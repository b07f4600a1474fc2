"""``edge-agent probe``: show what this device has (memory budget, CPU, disk, temperatures, power)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli.config_cmd import add_config_argument
from agent.hardware.probe import probe_device
from agent.hardware.render import render_table
from agent.settings import load_settings


def add_parser(subparsers: Any) -> None:
    probe = subparsers.add_parser(
        "probe",
        help="read and print the device's hardware state",
        description="Read memory (with this process's cgroup limit), CPU, disk, temperatures and power "
        "the way the agent does, and print them. Note: the cgroup shown is the one this command runs "
        "in; the service's own limit applies when the daemon probes.",
    )
    add_config_argument(probe)
    probe.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    probe.add_argument("--sys-root", type=Path, default=None, help="sysfs root (default: [hardware] sys_root)")
    probe.add_argument("--proc-root", type=Path, default=None, help="procfs root (default: [hardware] proc_root)")
    probe.add_argument("--models-dir", type=Path, default=None, help="report free disk space where models are stored")
    probe.set_defaults(func=_probe)


def _probe(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, required=args.config is not None)
    models_dir = args.models_dir
    if models_dir is None and settings.model.path is not None:
        models_dir = settings.model.path.parent
    snapshot = probe_device(
        args.sys_root or settings.hardware.sys_root,
        args.proc_root or settings.hardware.proc_root,
        models_dir,
    )
    print(snapshot.model_dump_json(indent=2) if args.json else render_table(snapshot))
    return 0
