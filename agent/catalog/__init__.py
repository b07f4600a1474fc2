"""Model catalog and sizing: GGUF headers, the quant ladder, memory estimates and the fit decision.

``gguf_header`` reads what a model needs without loading it; ``estimate`` turns that into bytes;
``fit`` picks the quant for a device; ``catalog`` reads models.toml; ``quants`` knows the tags.
Hub access lives in ``hub`` (the only module here that does network I/O).
"""
