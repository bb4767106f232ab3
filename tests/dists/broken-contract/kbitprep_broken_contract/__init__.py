"""A kbitprep plugin broken on purpose: its object does not satisfy the backend contract."""
