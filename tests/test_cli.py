"""The ``multifd`` command line, end to end in subprocesses over loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from multifd_core.engine.digest import digest_of
from multifd_core.image import fill_mixed

PS = 4096


def multifd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "multifd_core.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def start_recv(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "multifd_core.cli", "recv", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    ram = np.zeros(8 << 20, dtype=np.uint8)
    fill_mixed(ram.reshape(-1, PS), seed=3)
    paths = {"pc.ram": tmp_path / "ram.img", "pc.bios": tmp_path / "bios.img"}
    paths["pc.ram"].write_bytes(ram.tobytes())
    paths["pc.bios"].write_bytes(bytes(range(256)) * 1024)
    return paths


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert err.startswith("multifd: error: "), err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_send_recv_end_to_end(images: dict[str, Path], tmp_path: Path, kind: str) -> None:
    addr = (f"tcp:127.0.0.1:{free_port()}" if kind == "tcp"
            else f"unix:{tmp_path / 'mfd.sock'}")
    out = tmp_path / "out"
    recv = start_recv("--listen", addr, "--out", str(out), "--json")
    send = multifd("send", f"pc.ram={images['pc.ram']}", f"pc.bios={images['pc.bios']}", addr,
                   "--channels", "3", "--json")
    r_out, r_err = recv.communicate(timeout=60)
    assert send.returncode == 0, send.stderr
    assert recv.returncode == 0, r_err
    summary = json.loads(send.stdout)
    assert summary["channels"] == 3 and len(summary["packets_per_channel"]) == 3
    assert summary["normal_pages"] + summary["zero_pages"] == (8 << 20) // PS + 64
    assert summary["wire_bytes"] > 0 and summary["compression_ratio"] == 1.0
    assert json.loads(r_out)["zero_pages"] == summary["zero_pages"]
    manifest = json.loads((out / "manifest.json").read_text())
    by_name = {b["name"]: b for b in manifest["blocks"]}
    assert set(by_name) == {"pc.ram", "pc.bios"}
    for name, path in images.items():
        entry = by_name[name]
        data = (out / entry["file"]).read_bytes()
        assert data == path.read_bytes()
        assert entry["length"] == len(data)
        assert entry[manifest["digest"]] == digest_of(data, manifest["digest"])
    assert not list(out.glob("*.partial"))


def test_methods_json_lists_none() -> None:
    proc = multifd("methods", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    none = next(m for m in report["methods"] if m["name"] == "none")
    assert none["code"] == 0 and none["distribution"] == "multifd-core"
    assert none["available"] is True and none["reason"] == ""
    assert none["engines"][0]["kind"] == "software"
    assert set(none) >= {"name", "code", "distribution", "version", "engines", "available",
                         "reason"}
    assert isinstance(report["failed"], list)


def test_unknown_method_names_installed_and_hint(images: dict[str, Path]) -> None:
    env_free = multifd("send", str(images["pc.bios"]), "tcp:127.0.0.1:1", "-c", "nosuch")
    assert_one_line_error(env_free, "unknown method 'nosuch'", "installed: none")


def test_known_but_missing_method_says_what_to_install() -> None:
    from multifd_core.methods.registry import MethodRegistry

    text = MethodRegistry(entry_points=False).unknown_message("zstd")
    assert "pip install multifd-zstd" in text


def test_excluded_method_says_so(images: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "multifd_core.cli", "send", str(images["pc.bios"]),
         "tcp:127.0.0.1:1", "-c", "zstd"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "MULTIFD_PLUGINS": ""})
    assert_one_line_error(proc, "'zstd' (multifd-zstd) is installed but excluded by "
                                "MULTIFD_PLUGINS=''")
    assert proc.returncode == 2


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["send", "/nonexistent/file", "tcp:127.0.0.1:9"], ["cannot read /nonexistent/file"]),
        (["send", "{bios}", "tcp:127.0.0.1:notaport"], ["bad address"]),
        (["send", "{bios}", "tcp:127.0.0.1:{closed}", "--connect-timeout", "0.5"],
         ["cannot connect to tcp:127.0.0.1:"]),
        (["send", "{bios}", "tcp:127.0.0.1:9", "--channels", "0"], ["out of range 1..255"]),
        (["recv", "--listen", "tcp:0.0.0.0:0", "--out", "{tmp}/o"], ["loopback"]),
        (["send", "{bios}", "tcp:127.0.0.1:9", "-c", "none", "--level", "3"],
         ["takes no level"]),
    ],
)
def test_user_errors_are_one_line(images: dict[str, Path], tmp_path: Path, args: list[str],
                                  needles: list[str]) -> None:
    subs = {"bios": str(images["pc.bios"]), "closed": str(free_port()), "tmp": str(tmp_path)}
    proc = multifd(*[a.format(**subs) for a in args])
    assert_one_line_error(proc, *needles)


def test_peer_refusal_is_reported_on_both_sides(images: dict[str, Path], tmp_path: Path) -> None:
    addr = f"tcp:127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    recv = start_recv("--listen", addr, "--out", str(out), "--compression", "nosuch-method")
    send = multifd("send", str(images["pc.bios"]), addr)
    _, r_err = recv.communicate(timeout=60)
    assert_one_line_error(send, "receiver refused the session", "unknown method 'nosuch-method'")
    assert recv.returncode != 0 and "Traceback" not in r_err
    assert not (out / "manifest.json").exists()


def test_8k_page_session(images: dict[str, Path], tmp_path: Path) -> None:
    addr = f"tcp:127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    recv = start_recv("--listen", addr, "--out", str(out), "--compression", "none")
    send = multifd("send", str(images["pc.bios"]), addr, "-c", "none", "--page-size", "8192",
                   "--json")
    recv.communicate(timeout=60)
    assert send.returncode == 0, send.stderr
    assert json.loads(send.stdout)["normal_pages"] == (256 * 1024) // 8192
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["page_size"] == 8192


def test_demo_main_job_small(tmp_path: Path) -> None:
    env = {**os.environ, "MULTIFD_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "multifd_core.cli", "demo", "--size-mib", "16",
                           "--methods", "none", "--json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (run,) = report["runs"]
    assert run["verified"] is True and run["method"] == "none"
    assert 0.35 < run["zero_pages"] / 4096 < 0.45


def test_send_auto_measures_the_link_and_uses_its_choice(images: dict[str, Path],
                                                         tmp_path: Path) -> None:
    addr = f"tcp:127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    recv = start_recv("--listen", addr, "--out", str(out), "--json")
    send = multifd("send", f"pc.ram={images['pc.ram']}", addr, "-c", "auto", "--json")
    recv.communicate(timeout=60)
    assert send.returncode == 0, send.stderr
    summary = json.loads(send.stdout)
    auto = summary["auto"]
    assert auto["link_bytes_per_s"] > 0
    assert summary["method"] == auto["method"]  # the receiver took the chooser's pick
    assert {c["method"] for c in auto["candidates"]} >= {"none"}
    assert (out / "manifest.json").exists()


def test_recv_engine_must_exist_for_the_method(images: dict[str, Path], tmp_path: Path) -> None:
    addr = f"tcp:127.0.0.1:{free_port()}"
    recv = start_recv("--listen", addr, "--out", str(tmp_path / "o"), "-c", "none",
                      "--engine", "warp-drive")
    send = multifd("send", str(images["pc.bios"]), addr)
    _, r_err = recv.communicate(timeout=60)
    assert_one_line_error(send, "receiver refused the session", "warp-drive")
    assert recv.returncode != 0 and "Traceback" not in r_err
