"""Every test run: under CI (``CI`` set, see ``multifd_core.testing.in_ci``) no test may skip.

A skip in CI hides a dependency CI should have, or a test that silently did not run, so it is
reported as a failure, whatever raised it (``pytest.skip``, ``skipif``, ``importorskip``, a
module-level skip). Only the tests below may skip there, each for a reason CI cannot change.
``xfail`` is not a skip and is left alone.
"""

from __future__ import annotations

from typing import Any

import pytest

from multifd_core.testing import in_ci

#: Node ids (without parameters) that may skip under CI, and why.
CI_MAY_SKIP = {
    "plugins/qpl/tests/test_qpl.py::test_hardware_path_is_exercised_only_with_a_device":
        "needs an Intel IAA device; CI machines have none",
    "plugins/qpl/tests/test_qpl.py::TestQplEngines::test_declarations_match_an_installed_header":
        "needs Intel QPL's header, which no Debian release packages",
    "plugins/uadk/tests/test_uadk.py::TestUadkEngines::test_declarations_match_an_installed_header":
        "needs UADK's header, which no Debian release packages",
}


def _reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip(report: Any, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"{what} skipped under CI, where only the tests in conftest.py's "
                       f"CI_MAY_SKIP may skip: {_reason(report.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and in_ci()
            and item.nodeid.split("[")[0] not in CI_MAY_SKIP):
        _fail_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():
        _fail_skip(report, collector.nodeid)
