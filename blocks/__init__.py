"""Connection blocks and the typed platform config."""
