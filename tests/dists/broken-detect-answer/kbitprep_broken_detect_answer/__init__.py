"""A kbitprep plugin broken on purpose: its detector answers with a dict instead of a Detection."""
