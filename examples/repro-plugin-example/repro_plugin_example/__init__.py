"""An example repro plugin: ``channel_rms`` (a normalizer) and ``flip_average`` (a test-time method)."""
