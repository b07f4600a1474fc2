"""Live adaptation: the pure policy that trades threads, quant and offload for heat, battery and memory."""

from agent.adapt.policy import (
    Action,
    CapQuant,
    Level,
    Observation,
    Offload,
    PolicyState,
    SetThreads,
    decide,
    mode,
    observe,
)
from agent.adapt.settings import AdaptSettings, ThermalLimits, board_limits

__all__ = [
    "Action",
    "AdaptSettings",
    "CapQuant",
    "Level",
    "Observation",
    "Offload",
    "PolicyState",
    "SetThreads",
    "ThermalLimits",
    "board_limits",
    "decide",
    "mode",
    "observe",
]
