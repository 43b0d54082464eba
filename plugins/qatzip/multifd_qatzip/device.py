"""Whether this machine has a QAT device libqatzip could use, found without loading libqatzip.

Two ways a QAT device reaches user space: the out-of-tree QAT driver's character devices
(``/dev/qat_*``), or a QAT function bound to ``vfio-pci`` (the in-kernel driver with qatlib,
what Debian's libqat4 uses). Without either, libqatzip only runs its software backup and
prints "Cannot open /dev/vfio" on every call, so the plugin uses it only on request.
"""

from __future__ import annotations

import glob
import os

INTEL = 0x8086
#: PCI device ids of QAT virtual functions, which qatlib drives through vfio-pci (the kernel's
#: adf_accel_devices.h ``ADF_*IOV_PCI_DEVICE_ID``: DH895xCC, C62x, C3xxx, D15xx, 200xx, C4xxx,
#: 4xxx, 401xx, 402xx, 420xx).
QAT_VF_IDS = frozenset({0x0443, 0x37C9, 0x19E3, 0x6F55, 0x18EF, 0x18A1,
                        0x4941, 0x4943, 0x4945, 0x4947})


def qat_devices(sys_root: str = "/sys", dev_root: str = "/dev") -> list[str]:
    """The QAT devices found: ``/dev/qat_*`` nodes and PCI addresses of QAT functions bound
    to vfio-pci (empty: none). The roots are parameters so a test can build a tree."""
    found = sorted(glob.glob(os.path.join(dev_root, "qat_*")))
    for dev in sorted(glob.glob(os.path.join(sys_root, "bus/pci/devices/*"))):
        if _hex(dev, "vendor") == INTEL and _hex(dev, "device") in QAT_VF_IDS \
                and os.path.basename(os.path.realpath(os.path.join(dev, "driver"))) == "vfio-pci":
            found.append(f"{os.path.basename(dev)} (vfio-pci)")
    return found


def _hex(dev: str, name: str) -> int | None:
    try:
        with open(os.path.join(dev, name)) as f:
            return int(f.read().strip(), 16)
    except (OSError, ValueError):
        return None
