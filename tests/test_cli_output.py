"""What a user sees from the ``multifd`` command: a clean stderr (exactly what multifd says),
exit codes, ``-v`` logs, the engines in the summaries, progress, help and waiting for a sender.
Real processes over loopback; real libqatzip where it is asked for."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from multifd_core.image import fill_mixed
from multifd_core.progress import Progress
from multifd_core.wire.protocol import SIDE_KEYS

REPO = Path(__file__).resolve().parents[1]
PS = 4096


def env(**extra: str) -> dict[str, str]:
    """The environment of a run: this checkout's libqatzip unless one is chosen."""
    out = {**os.environ, **extra}
    libs = sorted(glob.glob(str(REPO / ".cache/qatzip/usr/lib/*/libqatzip.so.3")))
    if not out.get("MULTIFD_QATZIP_LIBRARY") and libs:
        out["MULTIFD_QATZIP_LIBRARY"] = libs[0]
    out.pop("MULTIFD_QATZIP_ENGINE", None) if "MULTIFD_QATZIP_ENGINE" not in extra else None
    return out


def multifd(*args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "multifd_core", *args], capture_output=True,
                          text=True, timeout=timeout, env=env(**extra))


def start(*args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "multifd_core", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(**extra))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    ram = np.zeros(4 << 20, dtype=np.uint8)
    fill_mixed(ram.reshape(-1, PS), seed=5)
    path = tmp_path / "ram.img"
    path.write_bytes(ram.tobytes())
    return path


def unix_addr(tmp_path: Path) -> str:
    return f"unix:{tmp_path / 'mfd.sock'}"


def pair(tmp_path: Path, image: Path, send_args: list[str], recv_args: list[str],
         send_env: dict[str, str] | None = None, recv_env: dict[str, str] | None = None,
         ) -> tuple[subprocess.CompletedProcess[str], tuple[int, str, str]]:
    """One session: ``multifd recv`` and ``multifd send`` as processes over a unix socket."""
    addr = unix_addr(tmp_path)
    recv = start("recv", "--listen", addr, "--out", str(tmp_path / "out"), *recv_args,
                 **(recv_env or {}))
    send = multifd("send", f"pc.ram={image}", addr, *send_args, **(send_env or {}))
    out, err = recv.communicate(timeout=120)
    return send, (recv.returncode, out, err)


# --------------------------------------------------------------------------- a clean stderr


@pytest.mark.parametrize(("method", "extra"), [
    ("none", {}), ("zstd", {}), ("qpl", {}), ("qatzip", {}),
    ("qatzip", {"MULTIFD_QATZIP_ENGINE": "libqatzip"}),
], ids=["none", "zstd", "qpl", "qatzip", "qatzip-libqatzip"])
def test_stderr_carries_nothing_but_multifd(tmp_path: Path, image: Path, method: str,
                                            extra: dict[str, str]) -> None:
    """A session prints nothing on stderr on either end, libqatzip without a QAT device
    included (it prints "Cannot open /dev/vfio" on every call)."""
    if extra and not glob.glob(str(REPO / ".cache/qatzip/usr/lib/*/libqatzip.so.3")) \
            and not os.environ.get("MULTIFD_QATZIP_LIBRARY"):
        pytest.skip("no libqatzip: run scripts/setup-system.sh as root")
    send, (rc, out, err) = pair(tmp_path, image, ["-c", method, "--json"], ["--json"],
                                send_env=extra, recv_env=extra)
    assert send.returncode == 0 and rc == 0, (send.stderr, err)
    assert send.stderr == "" and err == ""
    engines = json.loads(send.stdout)["engines"]
    if extra:
        assert engines["sender"]["engine"] == engines["receiver"]["engine"] == "libqatzip"


def test_demo_is_quiet_and_names_the_engines(tmp_path: Path) -> None:
    """The main job prints its table on stdout and nothing on stderr (qatzip's default engine
    without a QAT device is ours; before, libqatzip printed a line per call: 1012 lines)."""
    proc = multifd("demo", "--size-mib", "8", "--methods", "none", "qpl", "qatzip",
                   timeout=300, MULTIFD_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"none", "qpl", "qatzip"}
    assert rows["qpl"].endswith("software: isal, native") or "zlib" in rows["qpl"]
    assert all(" yes " in row for row in rows.values())


def test_methods_and_help_are_quiet() -> None:
    for args in (["methods"], ["methods", "--json"], ["--help"], ["send", "--help"]):
        proc = multifd(*args)
        assert proc.returncode == 0 and proc.stderr == "", (args, proc.stderr)


# --------------------------------------------------------------------------- what ran


def test_json_names_both_sides_engines(tmp_path: Path, image: Path) -> None:
    """send --json and recv --json both name each side's method, level, engine, kind,
    library, version and path; here the sender runs qpl's Python fallback loop
    (MULTIFD_PAGECODEC=off) and the receiver the native per-packet helper."""
    send, (rc, out, err) = pair(tmp_path, image, ["-c", "qpl", "--json"], ["--json"],
                                send_env={"MULTIFD_PAGECODEC": "off"})
    assert send.returncode == 0 and rc == 0, (send.stderr, err)
    sent, got = json.loads(send.stdout)["engines"], json.loads(out)["engines"]
    assert sent == got  # both ends report the same two descriptions
    for side in sent.values():
        assert set(side) == set(SIDE_KEYS) and side["method"] == "qpl"
        assert side["engine"] == "software" and side["kind"] == "software"
        assert side["library"] in ("isal", "zlib") and side["library_version"]
    assert sent["sender"]["path"] == "fallback" and sent["receiver"]["path"] == "native"


def test_human_summary_names_both_engines(tmp_path: Path, image: Path) -> None:
    send, (rc, out, _) = pair(tmp_path, image, ["-c", "zstd", "--level", "3"], [])
    assert send.returncode == 0 and rc == 0
    for text in (send.stdout, out):
        lines = text.splitlines()
        assert lines[1].startswith("sender:   zstd level 3, engine software (software; zstd ")
        assert lines[1].endswith("; native)")
        assert lines[2].startswith("receiver: zstd level 3, engine software (software; zstd ")


# --------------------------------------------------------------------------- -v


SEND_LOG = [r"main channel connected to unix:", r"offering zlib \(0x02\); requiring zlib",
            r"receiver chose zlib; its engine: zlib level 1, engine software",
            r"engine: zlib level 1",
            r"channel 0 connected", r"channel 1 connected", r"round 0: pc\.ram 1024 pages",
            r"channel 1: \d+ packets \+ 1 syncs, \d+ normal \+ \d+ zero pages",
            r"phases: connecting [\d.]+ s, negotiating [\d.]+ s, transferring [\d.]+ s, "
            r"verifying [\d.]+ s"]
RECV_LOG = [r"listening on unix:", r"main channel from", r"sender offers zlib \(0x02\)",
            r"chose zlib: required by the sender", r"engine: zlib level 1, engine software",
            r"channel [01] connected", r"round 0: every channel synced",
            r"sender's engine: zlib level 1", r"channel 0: \d+ packets",
            r"phases: waiting [\d.]+ s, negotiating [\d.]+ s, transferring [\d.]+ s, "
            r"syncing [\d.]+ s, verifying [\d.]+ s"]


@pytest.mark.parametrize("where", ["after", "before"])
def test_verbose_logs_each_step(tmp_path: Path, image: Path, where: str) -> None:
    """-v (after the command, or before it) logs negotiation, engines, channel connects,
    rounds, per-channel stats and phase timings, one line each; stdout keeps the summary."""
    addr = unix_addr(tmp_path)
    rv = ["recv", "-v"] if where == "after" else ["-v", "recv"]
    sv = ["send", "-v"] if where == "after" else ["-v", "send"]
    recv = start(*rv, "--listen", addr, "--out", str(tmp_path / "out"))
    send = multifd(*sv, f"pc.ram={image}", addr, "-c", "zlib")
    _, r_err = recv.communicate(timeout=120)
    assert send.returncode == 0 and recv.returncode == 0, (send.stderr, r_err)
    for lines, patterns in ((send.stderr, SEND_LOG), (r_err, RECV_LOG)):
        assert all(line.startswith("multifd: ") for line in lines.splitlines()), lines
        for pattern in patterns:
            assert re.search(pattern, lines), (pattern, lines)
    assert send.stdout.startswith("zlib: 4.0 MiB in ")


def test_a_failed_plugin_shows_its_traceback_under_v(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "multifd_broken-0.1.dist-info").mkdir(parents=True)
    (site / "multifd_broken-0.1.dist-info/METADATA").write_text(
        "Metadata-Version: 2.1\nName: multifd-broken\nVersion: 0.1\n")
    (site / "multifd_broken-0.1.dist-info/entry_points.txt").write_text(
        "[multifd.methods]\nbroken = broken_plugin_mod\n")
    (site / "broken_plugin_mod.py").write_text(textwrap.dedent("""
        def helper():
            raise ImportError("libbroken.so.7: cannot open shared object file")
        helper()
    """))
    extra = {"PYTHONPATH": str(site)}
    quiet = multifd("methods", **extra)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert "failed plugin broken (multifd-broken): import failed" in quiet.stdout
    loud = multifd("methods", "-v", **extra)
    assert "plugin broken (multifd-broken) failed to import:\nTraceback" in loud.stderr
    assert 'broken_plugin_mod.py", line 4, in <module>' in loud.stderr
    assert "in helper" in loud.stderr and "libbroken.so.7" in loud.stderr


# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(("args", "needle"), [
    (["send", "{img}", "tcp:127.0.0.1:9", "--channels", "0"], "argument --channels/-n: 0 out "
                                                              "of range 1..255"),
    (["send", "{img}", "tcp:127.0.0.1:notaport"], "bad address 'tcp:127.0.0.1:notaport'"),
    (["send", "{img}", "tcp:127.0.0.1:9", "-c", "zstd", "--level", "99"],
     "level 99 is out of range for method zstd: valid levels are 0 to 20"),
    (["send", "{img}", "tcp:127.0.0.1:9", "-c", "nosuch"], "unknown method 'nosuch'"),
    (["send", "{img}", "tcp:127.0.0.1:9", "-c", "zstd", "--engine", "warp"],
     "method zstd has no engine 'warp'"),
    (["send", "{img}", "tcp:127.0.0.1:9", "--timeout", "0"], "must be more than 0 seconds"),
    (["recv", "--listen", "tcp:host:port", "--out", "o"], "bad address 'tcp:host:port'"),
    (["recv", "--listen", "tcp:127.0.0.1:0"], "the following arguments are required: --out"),
    (["recv", "--listen", "tcp:127.0.0.1:0", "--out", "o", "--wait-first", "x"],
     "not a number of seconds"),
    (["methods", "--bogus"], "unrecognized arguments: --bogus"),
    (["qemu", "capture", "--out", "o", "--listen", "unix:/x"], "tcp:HOST:PORT only"),
])
def test_usage_errors_exit_2_in_one_line(image: Path, args: list[str], needle: str) -> None:
    proc = multifd(*[a.format(img=image) for a in args])
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert err.startswith("multifd: error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err


def test_a_failed_session_exits_1(image: Path, tmp_path: Path) -> None:
    proc = multifd("send", str(image), unix_addr(tmp_path), "--connect-timeout", "0.3")
    assert proc.returncode == 1 and proc.stderr.startswith("multifd: error: cannot connect")


# --------------------------------------------------------------------------- help


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out += _parsers(child)
    return out


def test_every_option_has_help_with_its_default() -> None:
    """Every option of every command has help; one that takes a value says its default
    (or that it is required)."""
    from multifd_core.cli import build_parser

    checked = 0
    for parser in _parsers(build_parser()):
        if parser.prog.startswith("multifd bench"):
            continue  # bench's options belong to the bench suite
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.dest == "help":
                continue
            assert action.help, f"{parser.prog} {action.option_strings or action.dest}"
            if action.option_strings and action.nargs != 0 and not isinstance(
                    action, argparse._VersionAction):
                shown = parser._get_formatter()._get_help_string(action) % vars(action)
                assert re.search(r"default|required", shown), (parser.prog, action.dest)
                checked += 1
        assert "%(" not in text
    assert checked > 30


def test_help_lists_the_environment() -> None:
    text = multifd("--help").stdout
    for var in ("MULTIFD_PLUGINS", "MULTIFD_STRICT_PLUGINS", "MULTIFD_CACHE",
                "MULTIFD_QATZIP_ENGINE", "MULTIFD_QPL_ENGINE", "MULTIFD_UADK_ENGINE",
                "MULTIFD_QATZIP_LIBRARY", "MULTIFD_PAGECODEC"):
        assert var in text


def test_python_dash_m() -> None:
    proc = multifd("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("multifd 0.")


# --------------------------------------------------------------------------- waiting


def test_recv_waits_for_the_first_sender_as_long_as_asked(tmp_path: Path,
                                                          image: Path) -> None:
    """--wait-first inf outlasts --timeout until the sender comes; --wait-first N gives up
    after N seconds with the reason."""
    addr = unix_addr(tmp_path)
    recv = start("recv", "--listen", addr, "--out", str(tmp_path / "out"), "--timeout", "1",
                 "--wait-first", "inf", "--json")
    deadline = time.monotonic() + 30
    while not (tmp_path / "mfd.sock").exists():
        assert time.monotonic() < deadline and recv.poll() is None
        time.sleep(0.05)
    time.sleep(2.5)  # more than --timeout: a receiver with the old rule has given up by now
    assert recv.poll() is None
    send = multifd("send", f"pc.ram={image}", addr, "--json")
    _, err = recv.communicate(timeout=60)
    assert send.returncode == 0 and recv.returncode == 0, err

    started = time.monotonic()
    proc = multifd("recv", "--listen", unix_addr(tmp_path), "--out", str(tmp_path / "o2"),
                   "--wait-first", "0.5", "--timeout", "30")
    assert proc.returncode == 1
    assert proc.stderr == "multifd: error: no sender connected within 0.5 s\n"
    assert time.monotonic() - started < 25


def test_capture_waits_for_the_source_as_long_as_asked(tmp_path: Path) -> None:
    short = multifd("qemu", "capture", "--listen", "tcp:127.0.0.1:0", "--out",
                    str(tmp_path / "a"), "--wait-first", "0.5", "--timeout", "30")
    assert short.returncode == 1 and "no main connection (QEVM) within 0.5 s" in short.stderr
    cap = start("qemu", "capture", "--listen", "tcp:127.0.0.1:0", "--out",
                str(tmp_path / "b"), "--wait-first", "0", "--timeout", "1")
    try:
        time.sleep(2.5)  # more than --timeout
        assert cap.poll() is None
    finally:
        cap.kill()
        cap.communicate()


# --------------------------------------------------------------------------- progress


def test_progress_on_both_ends(tmp_path: Path, image: Path) -> None:
    send, (rc, _, err) = pair(tmp_path, image, ["--progress", "--json"], ["--progress"])
    assert send.returncode == 0 and rc == 0
    for text, label, phases in ((send.stderr, "send", ("transferring", "verifying")),
                                (err, "recv", ("transferring", "syncing", "verifying"))):
        # text mode reads "\r" as a line end: a frame per line
        frames = [f.rstrip() for f in text.splitlines() if f.strip()]
        assert all(f.startswith(label + " ") for f in frames), frames
        for phase in phases:
            assert any(f.split()[1] == phase for f in frames), (phase, frames)
        assert "100.0%" in frames[-1] and "4.0/4.0 MiB" in frames[-1]
        assert re.search(r"\d+\.\d\d GB/s", frames[-1]) and "ETA" not in frames[-1]
        assert text.endswith("\n")


def test_progress_is_off_without_a_terminal(tmp_path: Path, image: Path) -> None:
    send, (rc, _, err) = pair(tmp_path, image, [], ["--no-progress"])
    assert send.returncode == 0 and rc == 0 and send.stderr == "" and err == ""


def test_progress_final_rate_stops_falling(tmp_path: Path) -> None:
    """The rate freezes when every byte is in; the hashing and syncing after it do not
    lower it. ETA shows while bytes move."""
    now = [0.0]
    done = [0]
    out = open(tmp_path / "progress.txt", "w")  # noqa: SIM115
    p = Progress("send", enabled=False, stream=out, clock=lambda: now[0])
    p.measure(1000, lambda: done[0])
    p.phase("transferring")
    now[0], done[0] = 1.0, 250
    assert p.rate() == (250.0, 250)
    assert "ETA 0:03" in p.line()
    now[0], done[0] = 2.0, 1000
    assert p.rate() == (500.0, 1000)
    p.phase("verifying")
    now[0] = 10.0
    assert p.rate() == (500.0, 1000)
    assert "ETA" not in p.line() and "100.0%" in p.line()
    out.close()


# --------------------------------------------------------------------------- MULTIFD_PLUGINS


@pytest.mark.parametrize(("send_args", "recv_args", "send_env", "recv_env", "needle"), [
    (["-c", "zstd"], [], {}, {"MULTIFD_PLUGINS": "-zstd"},
     "sender requires method zstd, which is installed on the receiver but excluded by "
     "MULTIFD_PLUGINS there"),
    ([], ["-c", "zstd"], {"MULTIFD_PLUGINS": "-zstd"}, {},
     "here method 'zstd' is installed but excluded by MULTIFD_PLUGINS"),
    ([], ["-c", "zstd"], {}, {"MULTIFD_PLUGINS": "zlib"},
     "'zstd' (multifd-zstd) is installed but excluded by MULTIFD_PLUGINS='zlib'"),
], ids=["sender-requires", "receiver-requires-sender-excludes", "receiver-excludes-its-own"])
def test_exclusions_are_named_on_both_ends(tmp_path: Path, image: Path, send_args: list[str],
                                           recv_args: list[str], send_env: dict[str, str],
                                           recv_env: dict[str, str], needle: str) -> None:
    send, (rc, _, err) = pair(tmp_path, image, send_args, recv_args, send_env, recv_env)
    assert send.returncode == 1 and rc == 1
    assert send.stderr.startswith("multifd: error: receiver refused the session: ")
    assert needle in send.stderr and send.stderr.count("\n") == 1
    if "here method" not in needle:  # the receiver cannot know what the sender excludes
        assert needle in err and err.count("\n") == 1
