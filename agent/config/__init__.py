"""The configuration layer: one section model per capability, importing only pydantic and
:mod:`agent.settings_base`.

These modules sit at the bottom of the import graph (see docs/architecture.md, "Layers"): ``agent.settings``
assembles them into the file's top level, and every capability imports its own section from here, so
reading the config never loads the hardware probe, psutil, paho or llama.cpp.
"""
