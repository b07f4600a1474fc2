"""Fleet control: commands to one device, a group or all devices over MQTT, signed and idempotent.

``commands`` holds the wire models, target topics, the idempotency store and the dispatcher
(:class:`~agent.fleet.commands.FleetService`); ``signing`` the Ed25519 part; ``config_edit`` the
validated, atomic ``config-set``; ``settings`` the ``[fleet]`` config section.
"""
