"""The lz4 example against the multifd conformance kit."""

from multifd_core.testing import MethodConformance
from multifd_lz4 import Lz4


class TestLz4Conformance(MethodConformance):
    method_cls = Lz4
    stateful = True  # one frame of linked blocks per channel


class TestLz4HighLevelConformance(MethodConformance):
    method_cls = Lz4
    stateful = True
    options = {"level": 9}  # lz4 HC
    channels = 2
