"""A kbitprep plugin broken on purpose: its backend module needs a library that is not installed."""
