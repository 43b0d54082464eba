"""Faults: channels that close or stall, a main channel that goes away, a receiver that stops
reading or dies, a sender killed with SIGKILL, a full disk, a byte flipped in flight.

Both ends must end within a bounded time with a clear one-line error, leave no thread or file
behind, and the receiver's output must never look complete.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from netkit import (
    IN_CI,
    PS,
    FlipProxy,
    RawSender,
    Served,
    assert_no_engine_threads,
    frame,
    free_port,
    one_line_error,
    raw_packet,
    read_msg,
)

from multifd_core import wire
from multifd_core.engine.ram import RamBlock
from multifd_core.errors import MultiFDError, TransportError, WireError
from multifd_core.session import send_session
from multifd_core.session.transport import Address
from multifd_core.wire.protocol import Msg

CLI = [sys.executable, "-m", "multifd_core.cli"]
BOUND = 6.0  # seconds: every fault here must end both sides within this (timeouts are 1-2 s)


def assert_output_incomplete(out: Path) -> None:
    """No manifest, nothing that looks like a finished block."""
    if out.exists():
        names = [p.name for p in out.iterdir()]
        assert "manifest.json" not in names, names
        assert all(n.endswith(".partial") for n in names), names


def random_image(path: Path, mib: int, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).integers(0, 255, mib << 20, np.uint8)
                     .tobytes())
    return path


# --------------------------------------------------------------------------- receiver side


def _session_fault(act, expect: type, *texts: str) -> None:  # noqa: ANN001
    served = Served({"timeout": 1.0})
    sender = RawSender(served, channels=2)
    t = time.monotonic()
    act(sender)
    err = served.wait(BOUND)
    assert time.monotonic() - t < BOUND
    assert isinstance(err, expect) and any(t in str(err) for t in texts), repr(err)
    assert served.session.stats is None
    try:
        kind, body = read_msg(sender.main)
        assert kind is Msg.RESULT and body["ok"] is False and str(err) in body["error"]
    except (EOFError, OSError):
        pass  # the main channel was the thing that broke
    sender.close()
    assert_no_engine_threads()


def test_channel_closed_mid_packet() -> None:
    def act(s: RawSender) -> None:
        s.channels[1].sendall(raw_packet(normal=1, size=PS, offsets=[0])[:500])
        s.channels[1].close()

    _session_fault(act, WireError, "channel 1: multifd: unexpected EOF after packet header")


def test_channel_closed_mid_payload() -> None:
    def act(s: RawSender) -> None:
        s.channels[0].sendall(raw_packet(normal=1, size=PS, offsets=[0]) + b"x" * 1000)
        s.channels[0].close()

    _session_fault(act, WireError, "unexpected EOF in packet payload")


def test_channel_stalls() -> None:
    def act(s: RawSender) -> None:
        s.channels[0].sendall(raw_packet(normal=1, size=PS, offsets=[0])[:500])

    _session_fault(act, TransportError, "no data for 1.0 s")  # channel 0 (or idle 1)


def test_main_channel_closed_early() -> None:
    def act(s: RawSender) -> None:
        s.main.close()

    _session_fault(act, TransportError, "main channel closed by the peer")


def test_main_channel_silent() -> None:
    # Idle channels time out on their own (the engine's per-channel receive timeout).
    _session_fault(lambda s: None, TransportError,
                   "no session message and no channel progress for 1.0 s",
                   "no data for 1.0 s")


def test_a_round_longer_than_the_timeout_is_not_a_stall() -> None:
    """The timeout counts time without progress: a round that trickles in over 2.5 s with a
    1 s timeout completes."""
    served = Served({"timeout": 1.0})
    s = RawSender(served, channels=1, blocks=[("ram", 64 * PS)])
    for i in range(10):
        s.channels[0].sendall(raw_packet(normal=1, size=PS, offsets=[i * PS], num=i + 1)
                              + bytes([i + 1]) * PS)
        time.sleep(0.25)
    s.channels[0].sendall(bytes(wire.encode_sync_packet(99, PS)))
    s.main.sendall(frame(Msg.ROUND, b'{"round":0}'))
    s.channels[0].shutdown(socket.SHUT_WR)
    ram = bytearray(64 * PS)
    for i in range(10):
        ram[i * PS:(i + 1) * PS] = bytes([i + 1]) * PS
    digest = RamBlock("ram", ram).sha256()
    s.main.sendall(frame(Msg.DONE, b'{"digests":{"ram":"%s"}}' % digest.encode()))
    kind, body = read_msg(s.main)
    assert served.wait() is None and body == {"ok": True}
    s.close()


# --------------------------------------------------------------------------- sender side


def _big_block() -> RamBlock:
    return RamBlock("ram", np.random.default_rng(3).integers(0, 255, 96 << 20, np.uint8))


def _accept_then(behaviour: str):  # noqa: ANN202
    from netkit import read_msg as _read

    def run(lst: socket.socket, main: socket.socket) -> None:
        if behaviour == "mute":
            time.sleep(2)
            return
        _read(main)
        main.sendall(frame(Msg.ACCEPT, b'{"method":"none","code":0}'))
        chans = []
        lst.settimeout(5)
        for _ in range(2):
            c, _ = lst.accept()
            chans.append(c)
        if behaviour == "die":
            for c in [main, *chans]:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                c.close()
            return
        time.sleep(2.5)  # "stall": accepted, never reads
        for c in chans:
            c.close()

    return run


@pytest.mark.parametrize(
    ("behaviour", "text"),
    [
        ("stall", "no progress for 1.0 s"),
        ("die", ""),
        ("mute", "main channel: no message for 1.0 s"),
    ],
)
def test_sender_ends_when_the_receiver_fails(behaviour: str, text: str) -> None:
    from netkit import fake_receiver

    block = _big_block()
    with fake_receiver(_accept_then(behaviour)) as addr:
        t = time.monotonic()
        with pytest.raises(MultiFDError) as err:
            send_session([block], addr, method="none", channels=2, timeout=1.0)
        assert time.monotonic() - t < BOUND
    assert isinstance(err.value, TransportError) and text in str(err.value), str(err.value)
    assert_no_engine_threads()


# --------------------------------------------------------------------------- processes

PAUSING_SENDER = """
import sys, time
import numpy as np
from multifd_core.errors import MultiFDError
from multifd_core.engine.ram import RamBlock
from multifd_core.session import send_session
from multifd_core.session.transport import parse_address

addr, pause, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
block = RamBlock("ram", np.random.default_rng(0).integers(0, 255, 32 << 20, np.uint8))

def before(i):
    print(f"round {i}", flush=True)
    if i == 1:
        time.sleep(pause)

try:
    send_session([block], parse_address(addr), method="none", channels=2,
                 rounds=[{"ram": None}] * 3, before_round=before, timeout=timeout)
except MultiFDError as exc:
    print(f"multifd: error: {exc}", file=sys.stderr)
    sys.exit(1)
print("done", flush=True)
"""


def _pausing_sender(addr: str, pause: float, timeout: float = 2.0) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", PAUSING_SENDER, addr, str(pause),
                             str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _recv(addr: str, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, "recv", "--listen", addr, "--out", str(out), "--timeout",
                             "2", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_line(proc: subprocess.Popen[str], line: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = proc.stdout.readline()
        if got.strip() == line:
            return
        if not got and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.stderr.read()}")
    raise AssertionError(f"no {line!r} within {timeout} s")


def _finish(proc: subprocess.Popen[str], timeout: float = BOUND) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("did not end in time") from None
    return proc.returncode, err


def _kill_during_round_1(victim: subprocess.Popen[str], survivor: subprocess.Popen[str], *,
                         sender: subprocess.Popen[str] | None = None, settle: float = 0.0,
                         bound: float = BOUND) -> tuple[int, str]:
    """Once the sender logs round 1, SIGKILL ``victim``: the survivor's exit code and stderr,
    which must come within ``bound`` seconds. Both processes are reaped."""
    try:
        _wait_line(sender or victim, "round 1")
        time.sleep(settle)
        victim.send_signal(signal.SIGKILL)
        t = time.monotonic()
        rc, err = _finish(survivor)
        assert time.monotonic() - t < bound
    finally:
        for p in (victim, survivor):
            if p.poll() is None:
                p.kill()
            p.communicate()
    return rc, err


def test_sender_killed_with_sigkill(tmp_path: Path) -> None:
    addr = f"tcp:127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    recv = _recv(addr, out)
    send = _pausing_sender(addr, pause=60)
    rc, err = _kill_during_round_1(send, recv, settle=0.2)
    assert rc == 1
    one_line_error(err)
    # The main channel's EOF, or (on a loaded machine) an idle channel's own timeout first.
    assert "closed by the peer" in err or "no data for 2.0 s" in err, err
    assert_output_incomplete(out)
    assert list(out.iterdir()) == []  # partial files of a failed session are removed


def test_receiver_killed_with_sigkill(tmp_path: Path) -> None:
    addr = f"tcp:127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    recv = _recv(addr, out, "--keep-partial")
    send = _pausing_sender(addr, pause=1.0)
    rc, err = _kill_during_round_1(recv, send, sender=send, bound=BOUND + 1)
    assert rc == 1
    one_line_error(err)
    assert any(w in err for w in ("send failed", "closed by the peer", "receive failed")), err
    assert_output_incomplete(out)
    assert any(p.name.endswith(".ram.partial") for p in out.iterdir())  # --keep-partial


def test_byte_flipped_in_flight_is_caught_by_the_digest(tmp_path: Path) -> None:
    """A proxy flips one bit inside the first page payload of the channel: per-packet checks
    cannot see it; the end-to-end digest must."""
    image = random_image(tmp_path / "ram.img", 4)
    port = free_port()
    out = tmp_path / "out"
    recv = _recv(f"tcp:127.0.0.1:{port}", out)
    proxy = FlipProxy(Address("tcp", "127.0.0.1", port),
                      flip_at=wire.INIT_LEN + wire.ram_packet_len(PS) + 100)
    try:
        send = subprocess.run([*CLI, "send", f"ram={image}", str(proxy.addr), "-c", "none",
                               "--channels", "1", "--timeout", "5"], capture_output=True,
                              text=True, timeout=60)
        rc, err = _finish(recv, 30)
    finally:
        proxy.close()
        if recv.poll() is None:
            recv.kill()
            recv.communicate()
    assert proxy.flipped
    assert rc == 1
    one_line_error(err, "digest mismatch for ramblock(s) ram")
    assert send.returncode == 1
    one_line_error(send.stderr, "receiver reports: digest mismatch")
    assert_output_incomplete(out)


def test_clean_proxy_control(tmp_path: Path) -> None:
    """The same path without the flip verifies (so the test above fails for the flip)."""
    image = random_image(tmp_path / "ram.img", 4)
    port = free_port()
    out = tmp_path / "out"
    recv = _recv(f"tcp:127.0.0.1:{port}", out)
    proxy = FlipProxy(Address("tcp", "127.0.0.1", port), flip_at=None)
    try:
        send = subprocess.run([*CLI, "send", f"ram={image}", str(proxy.addr), "-c", "none",
                               "--channels", "1"], capture_output=True, text=True, timeout=60)
        rc, err = _finish(recv, 30)
    finally:
        proxy.close()
    assert send.returncode == 0 and rc == 0, (send.stderr, err)
    assert json.loads((out / "manifest.json").read_text())["blocks"][0]["name"] == "ram"


# --------------------------------------------------------------------------- full disk


@pytest.fixture
def small_fs(tmp_path: Path):  # noqa: ANN201
    """A 4 MiB tmpfs (needs root to mount)."""
    def unavailable(why: str) -> None:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)

    if os.geteuid() != 0:
        unavailable("mounting a small tmpfs needs root (run as root, as CI does)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode:
        unavailable(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("sparse", [False, True])
def test_full_disk_refuses_the_session_up_front(tmp_path: Path, small_fs: Path,
                                                sparse: bool) -> None:
    image = random_image(tmp_path / "ram.img", 8)
    addr = f"tcp:127.0.0.1:{free_port()}"
    out = small_fs / "out"
    recv = _recv(addr, out, *(["--sparse"] if sparse else []))
    send = subprocess.run([*CLI, "send", f"ram={image}", addr], capture_output=True, text=True,
                          timeout=60)
    rc, err = _finish(recv, 30)
    need = "not enough space in"  # checked for all blocks together, sparse or not
    assert rc == 1
    one_line_error(err, need)
    assert send.returncode == 1
    one_line_error(send.stderr, "receiver refused the session", need)
    assert list(out.iterdir()) == []


def test_disk_filling_up_mid_session(tmp_path: Path, small_fs: Path) -> None:
    """The blocks' space is reserved up front; another writer fills the disk mid-session, so
    the manifest cannot be written: both ends fail, no manifest, nothing left behind."""
    addr = f"tcp:127.0.0.1:{free_port()}"
    out = small_fs / "out"
    recv = _recv(addr, out)
    script = PAUSING_SENDER.replace("32 << 20", "2 << 20")
    send = subprocess.Popen([sys.executable, "-c", script, addr, "1.5", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (rc, err), (src, serr) = _fill_after_round_1(send, recv, small_fs)
    assert rc == 1
    one_line_error(err, "no space left on the device while writing", "manifest.json")
    assert src == 1
    one_line_error(serr, "receiver reports: no space left on the device")
    assert not any(p.name.startswith("0") for p in out.iterdir()), list(out.iterdir())


def test_sender_reports_the_receivers_reason() -> None:
    """A header corrupted in flight: the receiver refuses the packet and says why on the main
    channel; the sender, whose channel is then cut, reports that reason."""
    served = Served({"timeout": 2.0})
    # Flip a bit of the first packet's next_packet_size (header bytes 20..23).
    proxy = FlipProxy(served.addr, flip_at=wire.INIT_LEN + 23)
    block = RamBlock("ram", np.random.default_rng(5).integers(0, 255, 64 << 20, np.uint8))
    try:
        t = time.monotonic()
        with pytest.raises(TransportError) as err:
            send_session([block], proxy.addr, method="none", channels=1, timeout=2)
        assert time.monotonic() - t < BOUND
    finally:
        proxy.close()
    assert isinstance(served.wait(), WireError)
    assert "; receiver reports: channel 0: " in str(err.value), str(err.value)
    assert "next_packet_size" in str(err.value), str(err.value)
    assert_no_engine_threads()


HALVES_SENDER = """
import sys, time
import numpy as np
from multifd_core.errors import MultiFDError
from multifd_core.engine.ram import RamBlock
from multifd_core.session import send_session
from multifd_core.session.transport import parse_address

addr, pause = sys.argv[1], float(sys.argv[2])
block = RamBlock("ram", np.random.default_rng(0).integers(0, 255, 2 << 20, np.uint8))
half = block.n_pages // 2

def before(i):
    print(f"round {i}", flush=True)
    if i == 1:
        time.sleep(pause)

try:
    send_session([block], parse_address(addr), method="none", channels=1, timeout=5,
                 rounds=[{"ram": np.arange(half)}, {"ram": np.arange(half, 2 * half)}],
                 before_round=before)
except MultiFDError as exc:
    print(f"multifd: error: {exc}", file=sys.stderr)
    sys.exit(1)
"""


def _fill_after_round_1(send: subprocess.Popen[str], recv: subprocess.Popen[str],
                        fs: Path) -> tuple[tuple[int, str], tuple[int, str]]:
    """Once the sender starts round 1, fill ``fs`` with another file; both ends' results."""
    try:
        _wait_line(send, "round 1")
        with open(fs / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\xff" * 65536)
            except OSError:
                pass
        return _finish(recv, 30), _finish(send, 30)
    finally:
        for p in (send, recv):
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_sparse_output_checks_free_space_for_all_blocks_together(tmp_path: Path,
                                                                 small_fs: Path) -> None:
    """Two 3 MiB blocks on a 4 MiB disk: each fits alone, not both; refused up front."""
    a, b = random_image(tmp_path / "a.img", 3), random_image(tmp_path / "b.img", 3, seed=1)
    addr = f"tcp:127.0.0.1:{free_port()}"
    out = small_fs / "out"
    recv = _recv(addr, out, "--sparse")
    send = subprocess.run([*CLI, "send", f"a={a}", f"b={b}", addr], capture_output=True,
                          text=True, timeout=60)
    rc, err = _finish(recv, 30)
    assert rc == 1 and send.returncode == 1
    one_line_error(err, "not enough space in", "need up to 6291456 bytes")
    assert list(out.iterdir()) == []


def test_sparse_disk_filling_mid_session_names_the_file(tmp_path: Path, small_fs: Path) -> None:
    """A sparse output's pages land through its mapping; when another writer has filled the
    disk, the store fails (EFAULT inside the receive call): reported as a full disk, naming
    the block's file, not as "Bad address"."""
    addr = f"tcp:127.0.0.1:{free_port()}"
    out = small_fs / "out"
    recv = _recv(addr, out, "--sparse")
    send = subprocess.Popen([sys.executable, "-c", HALVES_SENDER, addr, "1.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (rc, err), _ = _fill_after_round_1(send, recv, small_fs)
    assert rc == 1
    one_line_error(err, "no space left on the device while writing", "000-ram.ram.partial")
    assert not any(p.name.startswith("0") for p in out.iterdir()), list(out.iterdir())
