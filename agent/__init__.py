"""edge-agent: serve small GGUF language models over MQTT from Linux boards."""

__version__ = "0.1.0"
