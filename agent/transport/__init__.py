"""MQTT transport: topic names, wire messages, and the single module that talks to paho (``mqtt.py``)."""
