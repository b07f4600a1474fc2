"""``edge-agent plan`` and ``edge-agent pull``: choose the quant that fits, and fetch it from the Hub."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from agent.cli.config_cmd import add_config_argument
from agent.cli.progress import TransferBar
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
        help="download a model's quant (the one that fits, or MODEL:QUANT) into the Hub cache; MODEL is a "
        "catalog name or a Hub repo (org/repo)",
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
    """This device's conditions (the daemon's rule), with the operator's --ram-available/--temperature/
    --soft-limit/--battery in place of what the probe read."""
    from agent.adapt.settings import board_limits  # noqa: PLC0415 - keeps `--help` light
    from agent.catalog.planner import parse_size  # noqa: PLC0415
    from agent.hardware.conditions import (  # noqa: PLC0415
        BatteryReading,
        Memory,
        make_conditions,
        read_battery,
        read_memory,
        throttle_now,
    )
    from agent.hardware.probe import probe_device  # noqa: PLC0415

    snap = probe_device(settings.hardware.sys_root, settings.hardware.proc_root, None)
    limits = board_limits(snap, settings.adapt)
    soft, hard = limits.soft_c, limits.hard_c
    temperature, flags = snap.thermal.max_temp_c, throttle_now(snap)
    battery, memory = read_battery(snap.power), read_memory(snap.memory)
    ram = getattr(args, "ram_available", None)
    if ram:
        try:
            memory = Memory(available_bytes=parse_size(ram))
        except ValueError as exc:
            raise ConfigError(f"--ram-available: {exc}") from None
    if getattr(args, "temperature", None) is not None or getattr(args, "soft_limit", None) is not None:
        # A pretended temperature stands for the whole thermal state: the probe's throttle bits do not count.
        temperature, flags = args.temperature, frozenset()
        if args.soft_limit is not None:
            soft, hard = args.soft_limit, max(hard, args.soft_limit)
    if getattr(args, "battery", None) is not None:
        battery = BatteryReading(name="--battery", percent=args.battery, discharging=True, status="Discharging")
    return make_conditions(
        temperature_c=temperature, flags=flags, battery=battery, memory=memory,
        soft_limit_c=soft, hard_limit_c=hard, cfg=settings.adapt,
    )


def _plan(args: argparse.Namespace) -> int:
    from agent.catalog.planner import configured_n_ctx, planner_from_settings  # noqa: PLC0415

    settings = _settings(args)
    name = args.model or settings.model.name
    if not name:
        raise ConfigError("no model given: use --model NAME or set [model] name")
    planner = planner_from_settings(settings, os.environ)
    # n_ctx and n_batch as the daemon plans them (ModelOwner.make_plan), unless --n-ctx says otherwise.
    plan = planner.plan(
        name,
        _conditions(settings, args),
        n_ctx=args.n_ctx or configured_n_ctx(settings.model),
        n_batch=settings.model.n_batch,
        quant=args.quant,
    )
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        mmap = {True: "mmap on", False: "mmap off (most weights repacked)", None: "mmap per file"}[plan.use_mmap]
        if plan.use_mmap is not None and settings.model.use_mmap is not None:
            mmap = f"mmap {'on' if plan.use_mmap else 'off'} (model.use_mmap)"
        print(f"{name} ({plan.entry.repo}@{plan.entry.revision}), n_ctx {plan.n_ctx} per slot, "
              f"{plan.parallel} slot{'s' if plan.parallel != 1 else ''}, KV {plan.kv_type}, {mmap}")
        for line in plan.decision.explain():
            print(line)
        if plan.decision.chosen:
            est = plan.options[plan.decision.chosen.quant].estimate
            print("estimate of the chosen quant:")
            for line in est.explain():
                print(f"  {line}")
    return 0 if plan.decision.chosen else 1


def _pull(args: argparse.Namespace) -> int:
    from agent.catalog.planner import configured_n_ctx, planner_from_settings  # noqa: PLC0415

    settings = _settings(args)
    name, _, quant = args.model.partition(":")
    planner = planner_from_settings(settings, os.environ)
    plan = planner.plan(name, _conditions(settings, args), n_ctx=configured_n_ctx(settings.model),
                        n_batch=settings.model.n_batch, quant=quant or None)
    chosen = plan.decision.require()
    progress = None if args.json or not sys.stderr.isatty() else TransferBar(f"{name}:{chosen.quant}", end_line=False)
    local = planner.ensure_present(plan, progress=progress)
    if progress is not None:
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps({"model": name, "quant": chosen.quant, **local.model_dump(mode="json")}, indent=2))
    else:
        state = "already present" if local.from_cache else f"downloaded {local.downloaded_bytes} bytes"
        print(f"{name}:{chosen.quant} → {local.path} ({state}, sha256 verified)")
    return 0
