"""What the device has: memory budget, CPU, disk, temperatures, power.

:mod:`agent.hardware.snapshot` holds the frozen data types and the pure derivations (memory budget,
throttle decoding, CPU percent); :mod:`agent.hardware.probe` fills them from sysfs/procfs under a root;
:mod:`agent.hardware.render` prints one for humans.
"""

from agent.hardware.probe import CpuPercentSampler, probe_device
from agent.hardware.snapshot import DeviceSnapshot

__all__ = ["CpuPercentSampler", "DeviceSnapshot", "probe_device"]
