"""Fleet control: commands to one device, a group or all devices over MQTT, signed and idempotent.

``service`` is the dispatcher (:class:`~agent.fleet.service.FleetService`); ``wire`` the command and
result models and :func:`~agent.fleet.wire.build_command` for operators; ``store`` the persisted result
store and nonce cache; ``errors`` the command errors besides ``signing``'s (the Ed25519 part);
``config_edit`` the validated, atomic ``config-set``. The command topics are in
:mod:`agent.transport.topics`; the ``[fleet]`` config section in :mod:`agent.config.fleet`.
"""
