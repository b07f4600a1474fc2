"""``edge-agent plan`` and ``edge-agent pull``: choose the quant that fits, and fetch it from the Hub."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from agent.cli.config_cmd import add_config_argument
from agent.errors import ConfigError
from agent.settings import Settings, load_settings


def add_parser(subparsers: Any) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="show which quant of a catalog model fits this device, and why",
        description="Estimate every quant of a catalog model (GGUF headers read from the cache or with HTTP "
        "Range requests, nothing downloaded) and choose for this device — or for the device the overrides "
        "describe, e.g. --ram-available 1.1GiB --temperature 78.",
    )
    add_config_argument(plan)
    plan.add_argument("--model", help="catalog entry (default: [model] name)")
    plan.add_argument("--catalog", help="models.toml to use (default: [model] catalog or the shipped one)")
    plan.add_argument("--quant", help="only consider this quant")
    plan.add_argument("--ram-available", help="pretend this much memory is available (1.5GiB, 800MB, bytes)")
    plan.add_argument("--temperature", type=float, help="pretend the SoC is at this temperature (°C)")
    plan.add_argument("--soft-limit", type=float, help="the board's soft temperature limit (°C)")
    plan.add_argument("--battery", type=float, help="pretend the battery is at this percent, discharging")
    plan.add_argument("--n-ctx", type=int, help="context size to plan for")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=_plan)

    pull = subparsers.add_parser(
        "pull",
        help="download a catalog model's quant (the one that fits, or MODEL:QUANT) into the Hub cache",
    )
    add_config_argument(pull)
    pull.add_argument("model", help="catalog entry, optionally with a quant: gemma-3-270m-it:Q8_0")
    pull.add_argument("--catalog", help="models.toml to use")
    pull.add_argument("--json", action="store_true")
    pull.set_defaults(func=_pull)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config, required=args.config is not None)
    if getattr(args, "catalog", None):
        settings.model.catalog = args.catalog
    return settings


def _conditions(settings: Settings, args: argparse.Namespace) -> Any:
    from agent.adapt.settings import board_limits  # noqa: PLC0415 - keeps `--help` light
    from agent.catalog.fit import BatteryState, ThermalState  # noqa: PLC0415
    from agent.catalog.planner import DeviceConditions, parse_size  # noqa: PLC0415
    from agent.hardware.probe import probe_device  # noqa: PLC0415

    snap = probe_device(settings.hardware.sys_root, settings.hardware.proc_root, None)
    limits = board_limits(snap, settings.adapt)
    cond = DeviceConditions.from_snapshot(snap, soft_limit_c=limits.soft_c, hard_limit_c=limits.hard_c)
    changes: dict[str, Any] = {}
    ram = getattr(args, "ram_available", None)
    if ram:
        try:
            changes["available_bytes"] = parse_size(ram)
        except ValueError as exc:
            raise ConfigError(f"--ram-available: {exc}") from None
        changes["cgroup_limit_bytes"] = None
    if getattr(args, "temperature", None) is not None or getattr(args, "soft_limit", None) is not None:
        soft = args.soft_limit if args.soft_limit is not None else limits.soft_c
        changes["thermal"] = ThermalState(
            temperature_c=args.temperature, soft_limit_c=soft, hard_limit_c=max(limits.hard_c, soft)
        )
    if getattr(args, "battery", None) is not None:
        changes["battery"] = BatteryState(percent=args.battery, discharging=True)
    if not changes:
        return cond
    from dataclasses import replace  # noqa: PLC0415

    return replace(cond, **changes)


def _plan(args: argparse.Namespace) -> int:
    from agent.catalog.planner import planner_from_settings  # noqa: PLC0415

    settings = _settings(args)
    name = args.model or settings.model.name
    if not name:
        raise ConfigError("no model given: use --model NAME or set [model] name")
    planner = planner_from_settings(settings, os.environ)
    plan = planner.plan(
        name,
        _conditions(settings, args),
        n_ctx=args.n_ctx or (settings.model.n_ctx if settings.model.name == name else None),
        quant=args.quant,
    )
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(f"{name} ({plan.entry.repo}@{plan.entry.revision}), n_ctx {plan.n_ctx}")
        for line in plan.decision.explain():
            print(line)
        if plan.decision.chosen:
            est = plan.options[plan.decision.chosen.quant].estimate
            print("estimate of the chosen quant:")
            for line in est.explain():
                print(f"  {line}")
    return 0 if plan.decision.chosen else 1


def _pull(args: argparse.Namespace) -> int:
    from agent.catalog.planner import planner_from_settings  # noqa: PLC0415

    settings = _settings(args)
    name, _, quant = args.model.partition(":")
    planner = planner_from_settings(settings, os.environ)
    plan = planner.plan(name, _conditions(settings, args), quant=quant or None)
    chosen = plan.decision.require()
    progress = None if args.json or not sys.stderr.isatty() else _progress_bar(f"{name}:{chosen.quant}")
    local = planner.ensure_present(plan, progress=progress)
    if progress is not None:
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps({"model": name, "quant": chosen.quant, **local.model_dump(mode="json")}, indent=2))
    else:
        state = "already present" if local.from_cache else f"downloaded {local.downloaded_bytes} bytes"
        print(f"{name}:{chosen.quant} → {local.path} ({state}, sha256 verified)")
    return 0


def _progress_bar(label: str) -> Any:
    def show(done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 0.0
        filled = int(pct / 4)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (25 - filled)}] {pct:5.1f}% {done / 2**20:8.1f} MiB")
        sys.stderr.flush()

    return show
