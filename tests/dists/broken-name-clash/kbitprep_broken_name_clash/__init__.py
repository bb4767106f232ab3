"""A kbitprep plugin broken on purpose: it claims the name of the built-in ``unquantized`` backend."""
