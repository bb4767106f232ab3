"""A kbitprep plugin broken on purpose: its detector raises on every model."""
