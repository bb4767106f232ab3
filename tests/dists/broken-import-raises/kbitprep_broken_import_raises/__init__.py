"""A kbitprep plugin broken on purpose: importing its backend raises RuntimeError."""
