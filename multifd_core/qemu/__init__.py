"""Interoperation with a real QEMU 10.0: the main migration stream, capture and replay.

``stream``: the main stream format (sans-IO reader and writer). ``qmp``: a small QMP client.
``vm``: launching test guests. ``capture``/``replay``: a destination and a source for real
QEMU built on the engine's ``Receiver``/``Sender``. ``cli``: the ``multifd qemu`` commands.
"""
