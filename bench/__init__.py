"""Benchmarks of edge-agent against the anchors a user would pick instead.

``python -m bench`` (``--quick`` for CI) runs the serving benchmark: raw llama-cpp-python, the daemon over
MQTT (streaming and not, one slot and four), and llama-cpp-python's OpenAI HTTP server, on the same model,
threads, context and prompts; see bench/__main__.py and docs/performance.md. The other scripts here
(fleet_sim.py, fuzz.py, estimate_accuracy.py) run on their own.
"""
