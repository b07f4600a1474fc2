"""The daemon's jobs: inference now; telemetry, offload and commands build on the same shape."""
