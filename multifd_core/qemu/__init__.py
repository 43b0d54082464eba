"""Interoperation with a real QEMU 10.0: the main migration stream, capture and replay.

``stream``: the main stream format (sans-IO reader and writer). ``qmp``: a small QMP client.
``vm``: launching test guests. ``capture``/``replay``: a destination and a source for real
QEMU built on the engine's ``Receiver``/``Sender``. ``cli``: the ``multifd qemu`` commands.
"""

#: The ``format`` of a capture directory's manifest (``capture`` writes it, ``replay``,
#: ``snapshot`` and ``verify`` check it); here so that a reader need not import the capture.
MANIFEST_FORMAT = "multifd-qemu-capture"
