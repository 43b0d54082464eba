"""The engine: RAM blocks (``ram``), one channel's packets between pages and the wire, sans-IO
(``pipeline``), the sending and receiving channel threads (``sender``, ``receiver``) and their
socket I/O (``sockio``); ``harness`` drives a method's hooks through the pipeline without
sockets."""
