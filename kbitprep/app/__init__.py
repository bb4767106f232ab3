"""kbitprep's application layer: the command line, the demo, planning and estimating from a config.

Everything here is built on the core (:mod:`kbitprep`'s pipeline, registry and plugin contract);
the core never imports this package (``tests/test_import_graph.py`` checks it).
"""
