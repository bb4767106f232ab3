"""A kbitprep plugin broken on purpose: its fix-up raises halfway through preparing.

The package is also its own tiny "quantization library": :class:`~kbitprep_broken_fixup.layers.FaultyQuantLinear`
stores an int8 weight with an fp16 per-row scale. The backend recognises models holding such layers
and declares a fix-up that changes the model in many ways (as a kernel repack would) and then fails,
the way the layer's ``fault`` attribute says: ``"raise"`` (RuntimeError), ``"interrupt"``
(KeyboardInterrupt, as Ctrl-C) or ``"none"`` (the fix-up completes).
"""
