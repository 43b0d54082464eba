"""The method contract: QEMU's ``MultiFDMethods`` hooks as a pluggy spec (``hookspecs``), the
``Method`` base (``method``), what the hooks see (``context``), the entry-point registry
(``registry``), the built-in ``none`` (``nocomp``), and the toolkits for methods that wrap a
native library (``native``) or code page by page (``perpage``)."""
