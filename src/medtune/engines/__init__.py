"""medtune.engines: the fine-tuning engine (Lightning) and the probe engine, and finalisation.

Layer 6 of the package (``docs/architecture.md``): engines take a run's settings, prepared data
and run folder, train, and return the trained image-level model; ``finalize`` calibrates,
measures and saves it in fp32, the deployment precision.
"""
