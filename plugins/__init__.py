"""kbitprep's built-in backend plugins (import name ``kbitprep_plugins``).

Each module holds one backend, written only against :mod:`kbitprep.plugin`, the same public
contract third-party plugins use, and published through kbitprep's own ``kbitprep.backends``
entry points.
"""
