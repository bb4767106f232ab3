"""A kbitprep plugin broken on purpose: its declarations contradict each other."""
