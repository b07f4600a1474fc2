"""``edge-agent gateway``: OpenAI- and Ollama-compatible HTTP in front of devices reached over MQTT.

- :mod:`agent.gateway.errors`: what can go wrong, with its HTTP status (pure).
- :mod:`agent.gateway.targets`: the live devices and groups from retained status/telemetry; model name → target.
- :mod:`agent.gateway.wire_request`: building and checking the native request (``agent.transport.wire``).
- :mod:`agent.gateway.openai_api`, :mod:`agent.gateway.ollama_api`: pure translation between each API's
  HTTP bodies and our wire messages.
- :mod:`agent.gateway.mqtt_client`: the one MQTT connection every HTTP request shares.
- :mod:`agent.gateway.app`: the ASGI routes (thin), auth, streaming, disconnects.

Nothing here imports starlette or uvicorn except :mod:`agent.gateway.app` (the optional ``gateway`` extra), so the
translation modules are usable and testable without them. See docs/gateway.md.
"""
