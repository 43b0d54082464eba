"""Plugin loading under the user's control, with real entry points of throwaway distributions.

Each test writes tiny distributions (a module plus a ``*.dist-info`` with ``entry_points.txt``,
as pip installs them) into a tmp dir on ``sys.path``; ``importlib.metadata`` finds them like any
installed plugin.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from multifd_core import API_VERSION
from multifd_core.errors import PluginError, UnknownMethodError
from multifd_core.methods.registry import THIRD_PARTY_CODES, MethodRegistry, check_method_class

METHOD = """
from multifd_core import Method, hookimpl


class M(Method):
    name = {name!r}
    code = {code}
    api_version = {api!r}
    description = "throwaway test method"

    @hookimpl
    def send_prepare(self, channel, packet):
        return packet.iovecs()

    @hookimpl
    def recv(self, channel, packet):
        packet.readinto_pages()


@hookimpl
def multifd_register_methods(register):
    register(M)
"""


class Site:
    """A directory on ``sys.path`` holding throwaway distributions."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.modules: list[str] = []
        monkeypatch.syspath_prepend(str(root))
        for var in ("MULTIFD_PLUGINS", "MULTIFD_STRICT_PLUGINS"):
            monkeypatch.delenv(var, raising=False)

    def dist(self, dist: str, ep: str, source: str) -> str:
        """Install distribution ``dist`` whose entry point ``ep`` is a module with ``source``."""
        module = f"throwaway_{self.root.name}_{ep}".replace("-", "_")
        (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[multifd.methods]\n{ep} = {module}\n")
        self.modules.append(module)
        return module

    def method(self, dist: str, ep: str, name: str, code: int,
               api: str = API_VERSION) -> str:
        return self.dist(dist, ep, METHOD.format(name=name, code=hex(code), api=api))


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "site"
    root.mkdir()
    s = Site(root, monkeypatch)
    yield s
    for module in s.modules:
        sys.modules.pop(module, None)


def failed(registry: MethodRegistry) -> dict[str, tuple[str, str]]:
    return {f.plugin: (f.distribution, f.error) for f in registry.failed}


def test_a_plugin_that_fails_to_import_is_reported_and_others_still_load(site: Site) -> None:
    site.dist("multifd-broken", "broken", "raise ImportError('libbroken.so.3 not found')\n")
    site.method("multifd-good", "good", "good", 0x0A)
    registry = MethodRegistry(only=["broken", "good"])
    assert failed(registry) == {
        "broken": ("multifd-broken",
                   "import failed: ImportError('libbroken.so.3 not found')")}
    assert registry.names() == ["none", "good"]
    assert registry.get("good").distribution == "multifd-good"
    with pytest.raises(UnknownMethodError, match="plugin 'broken' is installed but failed to "
                                                 "load: import failed"):
        registry.get("broken")


def test_a_plugin_with_a_syntax_error_or_no_hook_is_reported(site: Site) -> None:
    site.dist("multifd-typo", "typo", "def oops(:\n")
    site.dist("multifd-hookless", "hookless", "X = 1\n")
    registry = MethodRegistry(only=["typo", "hookless"])
    errors = failed(registry)
    assert errors["typo"][0] == "multifd-typo" and "SyntaxError" in errors["typo"][1]
    assert errors["hookless"] == ("multifd-hookless", "registration failed: it implements no "
                                  "multifd_register_methods hook")
    assert registry.names() == ["none"]


def test_strict_mode_turns_a_failed_plugin_into_an_error(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    site.dist("multifd-broken", "broken", "raise RuntimeError('boom')\n")
    site.method("multifd-good", "good", "good", 0x0A)
    monkeypatch.setenv("MULTIFD_PLUGINS", "broken,good")
    monkeypatch.setenv("MULTIFD_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"plugin broken \(multifd-broken\) failed: import "
                                          r"failed: RuntimeError\('boom'\)"):
        MethodRegistry()
    monkeypatch.setenv("MULTIFD_STRICT_PLUGINS", "0")
    assert "good" in MethodRegistry()
    with pytest.raises(PluginError):
        MethodRegistry(strict=True)


def test_multifd_plugins_selects_skips_and_disables(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    site.method("multifd-alpha", "alpha", "alpha", 0x0A)
    site.method("multifd-beta", "beta", "beta", 0x0C)
    site.dist("multifd-broken", "broken", "raise ImportError('x')\n")

    monkeypatch.setenv("MULTIFD_PLUGINS", "alpha")
    registry = MethodRegistry()
    assert registry.names() == ["none", "alpha"] and not registry.failed

    monkeypatch.setenv("MULTIFD_PLUGINS", "")  # empty: no plugin at all, as LLM_LOAD_PLUGINS
    registry = MethodRegistry()
    assert registry.names() == ["none"] and not registry.failed

    monkeypatch.setenv("MULTIFD_PLUGINS", "-broken,-beta")  # everything but these
    registry = MethodRegistry()
    assert "alpha" in registry and "beta" not in registry
    assert "broken" not in failed(registry)

    monkeypatch.delenv("MULTIFD_PLUGINS")  # unset: every installed plugin
    registry = MethodRegistry()
    assert {"alpha", "beta"} <= set(registry.names()) and "broken" in failed(registry)


def test_a_selected_plugin_that_is_not_installed_is_reported(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    site.method("multifd-alpha", "alpha", "alpha", 0x0A)
    monkeypatch.setenv("MULTIFD_PLUGINS", "alpha,nosuch")
    registry = MethodRegistry()
    assert "alpha" in registry
    assert "selected by MULTIFD_PLUGINS but no installed distribution" in \
        failed(registry)["nosuch"][1]
    monkeypatch.setenv("MULTIFD_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="nosuch"):
        MethodRegistry()


def test_an_incompatible_api_version_is_refused_naming_both(site: Site) -> None:
    site.method("multifd-future", "future", "future", 0x0A, api="2.3")
    site.method("multifd-minor", "minor", "minor", 0x0C, api=API_VERSION.split(".")[0] + ".9")
    registry = MethodRegistry(only=["future", "minor"])
    dist, error = failed(registry)["future"]
    assert dist == "multifd-future"
    assert "built for multifd-core API 2.3" in error
    assert f"this core provides API {API_VERSION}" in error
    assert "future" not in registry and "minor" in registry  # same major: compatible


def test_two_plugins_claiming_one_code_are_both_refused(site: Site) -> None:
    site.method("multifd-first", "first", "first", 0x0A)
    site.method("multifd-second", "second", "second", 0x0A)
    site.method("multifd-other", "other", "other", 0x0C)
    registry = MethodRegistry(only=["first", "second", "other"])
    assert "first" not in registry and "second" not in registry and "other" in registry
    errors = failed(registry)
    for plugin in ("first", "second"):
        text = errors[plugin][1]
        assert "flag code 0x0a claimed by both" in text
        assert "'first' (multifd-first)" in text and "'second' (multifd-second)" in text


def test_reserved_codes_are_refused_for_other_names(site: Site) -> None:
    site.method("multifd-fast", "fast", "fast", 0x04)  # zstd's bit
    site.method("multifd-fakezstd", "fakezstd", "zstd", 0x0C)  # zstd with a wrong code
    site.method("multifd-null", "null", "null", 0x00)  # none's code
    registry = MethodRegistry(only=["fast", "fakezstd", "null"])
    errors = failed(registry)
    assert "claims code 0x04, which QEMU reserves for 'zstd'" in errors["fast"][1]
    assert "free: 0x0a, 0x0c, 0x0e, 0x12" in errors["fast"][1]  # 0x06: the lz4 example's
    assert "method 'zstd' must use QEMU's code 0x04, not 0x0c" in errors["fakezstd"][1]
    assert "QEMU reserves for 'none'" in errors["null"][1]
    assert registry.names() == ["none"]


def test_a_plugin_cannot_replace_the_builtin_none(site: Site) -> None:
    site.method("multifd-evil", "evil", "none", 0x00)
    registry = MethodRegistry(only=["evil"])
    assert registry.get("none").distribution == "multifd-core"
    assert "already provided by multifd-core" in failed(registry)["evil"][1]


def test_two_plugins_claiming_one_name_are_both_refused(site: Site) -> None:
    """A name clash is treated as a code clash: neither plugin can be trusted with it."""
    site.method("multifd-first", "first", "same", 0x0A)
    site.method("multifd-second", "second", "same", 0x0C)
    site.method("multifd-other", "other", "other", 0x0E)
    registry = MethodRegistry(only=["first", "second", "other"])
    assert registry.names() == ["none", "other"]
    errors = failed(registry)
    for plugin in ("first", "second"):
        assert "method name 'same' claimed by both" in errors[plugin][1]
        assert "multifd-first" in errors[plugin][1] and "multifd-second" in errors[plugin][1]
    with pytest.raises(UnknownMethodError, match="unknown method 'same'"):
        registry.get("same")


def test_an_out_of_range_code_is_named_in_hex_with_the_free_codes() -> None:
    from multifd_core.methods.method import Method

    cls = type("X", (Method,), {"name": "x", "code": 0x40, "send_prepare": Method.send_setup,
                                "recv": Method.send_setup})
    with pytest.raises(PluginError) as err:
        check_method_class(cls)
    text = str(err.value)
    assert "declares code 0x40, outside the compression field 0x3e" in text
    free = text.split("free codes: ")[1].split(", ")
    assert len(free) == 25 and "0x06" not in free and free[0] == "0x0a" and free[-1] == "0x3e"


def test_an_excluded_plugin_is_named_as_such(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    site.method("multifd-alpha", "alpha", "alpha", 0x0A)
    site.method("multifd-beta", "beta", "beta", 0x0C)
    for setting in ("beta", "-alpha"):
        monkeypatch.setenv("MULTIFD_PLUGINS", setting)
        registry = MethodRegistry()
        assert registry.excluded_plugin("alpha") == "multifd-alpha"
        with pytest.raises(UnknownMethodError) as err:
            registry.get("alpha")
        assert (f"'alpha' (multifd-alpha) is installed but excluded by "
                f"MULTIFD_PLUGINS={setting!r}") in str(err.value)
    monkeypatch.delenv("MULTIFD_PLUGINS")
    assert MethodRegistry(only=["beta"]).excluded == {}  # only by the environment


def test_third_party_code_policy() -> None:
    """Values with two or more bits inside 0x3E are free; single bits belong to QEMU."""
    assert len(THIRD_PARTY_CODES) == 26
    assert all(c & 0x3E == c and bin(c).count("1") >= 2 for c in THIRD_PARTY_CODES)
    from multifd_core.methods.method import Method

    def make(code: object) -> type:
        return type("X", (Method,), {"name": "x", "code": code,
                                     "send_prepare": Method.send_setup, "recv": Method.send_setup})

    check_method_class(make(0x06))
    check_method_class(make(0x3E))
    for bad in (0x01, 0x40, 0x07, 0x100, -2, True, "0x06"):
        with pytest.raises(PluginError, match="code"):
            check_method_class(make(bad))


def test_a_lazy_registry_imports_only_the_plugin_a_session_names(site: Site) -> None:
    broken = site.dist("multifd-broken", "broken", "raise ImportError('libbroken.so.3')\n")
    other = site.method("multifd-beta", "beta", "beta", 0x0C)
    site.method("multifd-alpha", "alpha", "alpha", 0x0A)
    registry = MethodRegistry(only=["alpha", "beta", "broken"], lazy=True)
    assert registry.get("alpha").distribution == "multifd-alpha"
    assert "alpha" in registry and "none" in registry
    assert broken not in sys.modules and other not in sys.modules
    # Listing imports the rest, and only then is the broken one known.
    assert registry.names() == ["none", "alpha", "beta"]
    assert set(failed(registry)) == {"broken"}


def test_a_lazy_registry_finds_a_method_its_entry_point_is_not_named_after(site: Site) -> None:
    site.method("multifd-gamma", "gamma-plugin", "gamma", 0x0E)
    registry = MethodRegistry(only=["gamma-plugin"], lazy=True)
    assert registry.get("gamma").plugin == "gamma-plugin"
    with pytest.raises(UnknownMethodError, match="unknown method 'delta'; installed: none, "
                                                 "gamma"):
        registry.get("delta")


def test_strict_mode_loads_every_plugin_even_when_lazy(site: Site) -> None:
    site.dist("multifd-broken", "broken", "raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match="plugin broken"):
        MethodRegistry(only=["broken"], lazy=True, strict=True)


def test_a_send_that_names_its_method_imports_no_other_plugin(tmp_path: Path) -> None:
    """The installed plugins, in a fresh interpreter: naming zstd imports zstd's plugin only."""
    import subprocess

    probe = ("import sys\n"
             "from multifd_core.methods.registry import default_registry\n"
             "r = default_registry(); r.get('zstd')\n"
             "print(sorted(m for m in sys.modules if m.startswith('multifd_') "
             "and m.count('.') == 0))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path).stdout
    assert out.strip() == "['multifd_core', 'multifd_zstd']"
