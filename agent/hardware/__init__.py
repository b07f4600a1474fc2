"""What the device has: memory budget, CPU, disk, temperatures, power.

:mod:`agent.hardware.snapshot` holds the frozen data types and the pure derivations (memory budget,
throttle decoding, CPU percent); :mod:`agent.hardware.probe` fills them from sysfs/procfs under a root
(and is the only module that imports psutil or reads ``/sys`` and ``/proc``); :mod:`agent.hardware.render`
prints one for humans.

This package imports none of them: code that needs only the snapshot types (the policy, fit, telemetry)
must not pay for the probe and psutil. Import the submodule you use.
"""
