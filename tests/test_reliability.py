"""Reliability II: what a hostile peer or a planted output directory could do to `recv`.

Each test here failed on the code before the fix it guards (see the issue's closing note):
writes through planted links, waits without a deadline, a handshake that could be stretched,
receive memory bounded only by the peer, and the small ones (file descriptors, block names,
free space, a stale manifest, unix socket paths)."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from netkit import (
    PS,
    RawSender,
    Served,
    assert_no_engine_threads,
    assert_untouched,
    frame,
    free_port,
    hello_frame,
    one_line_error,
    plant_links,
    read_msg,
    require_method,
)

from multifd_core import wire
from multifd_core.engine.ram import RamBlock
from multifd_core.errors import MultiFDError, NegotiationError, TransportError, WireError
from multifd_core.session import send_session
from multifd_core.session.outdir import FileOutput, OutputDir, block_file_name
from multifd_core.wire import protocol
from multifd_core.wire.protocol import Msg

CLI = [sys.executable, "-m", "multifd_core.cli"]


def random_block(name: str = "ram", pages: int = 64, seed: int = 1) -> RamBlock:
    return RamBlock(name, np.random.default_rng(seed).integers(0, 255, pages * PS, np.uint8))


def recv_proc(out: Path, addr: str, *extra: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, "recv", "--listen", addr, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"still running after {timeout} s") from None
    return proc.returncode, err


def connect_when_listening(addr: str, timeout: float = 20) -> socket.socket:
    host, port = addr.removeprefix("tcp:").rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, int(port)), timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --------------------------------------------------------------------------- planted links

PLANTED = ["000-ram.ram.partial", "000-ram.ram", "manifest.json.partial", "manifest.json"]


def test_recv_never_writes_through_planted_links(tmp_path: Path) -> None:
    out = tmp_path / "out"
    victims = plant_links(out, PLANTED, tmp_path)
    addr = f"tcp:127.0.0.1:{free_port()}"
    recv = recv_proc(out, addr, "--timeout", "10")
    block = random_block()
    from multifd_core.session.transport import parse_address
    send_session([block], parse_address(addr), method="none", channels=2, timeout=10,
                 connect_timeout=20)
    rc, err = finish(recv, 30)
    assert rc == 0, err
    assert_untouched(victims)
    for name in ("000-ram.ram", "manifest.json"):
        assert not (out / name).is_symlink() and (out / name).is_file()
    assert (out / "000-ram.ram").read_bytes() == block.array.tobytes()
    assert sorted(p.name for p in out.iterdir()) == ["000-ram.ram", "manifest.json"]


def test_failed_session_never_writes_through_planted_links(tmp_path: Path) -> None:
    """Blocks allocated, then the sender goes away: the session fails, nothing is written
    through a link, what the session created is removed, and no manifest.json is left."""
    out = tmp_path / "out"
    victims = plant_links(out, PLANTED, tmp_path)
    output = FileOutput(out)
    served = Served({"timeout": 2.0, "reserve": output.reserve}, allocate=output.allocate)
    sender = RawSender(served, channels=1)
    sender.close()
    err = served.wait()
    output.discard()
    assert isinstance(err, MultiFDError), repr(err)
    assert_untouched(victims)
    # What it created is gone; the links it never wrote to are left alone.
    assert {p.name for p in out.iterdir()} <= {"000-ram.ram", "manifest.json.partial"}


def test_a_directory_in_the_way_is_refused_with_its_name(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "000-ram.ram.partial").mkdir(parents=True)
    output = FileOutput(out)
    with pytest.raises(MultiFDError, match="000-ram.ram.partial is a directory"):
        output.allocate("ram", 4 * PS, PS)
    output.discard()


def test_output_dir_replaces_links_and_renames_inside_its_directory(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "target").write_text("keep")
    d = OutputDir(out)
    (out / "a").symlink_to(elsewhere / "target")
    (out / "b").symlink_to(elsewhere / "target")
    d.write("a", b"new")
    d.rename("a", "b")
    assert (out / "b").read_bytes() == b"new" and not (out / "b").is_symlink()
    assert (elsewhere / "target").read_text() == "keep"
    with pytest.raises(MultiFDError, match="not created by this run"):
        d.rename("c", "d")
    with pytest.raises(MultiFDError, match="bad output file name"):
        d.create("../escape")
    d.close()


# --------------------------------------------------------------------------- deadlines


def test_hello_and_done_without_channels_ends_in_time(tmp_path: Path) -> None:
    """The peer sends HELLO and DONE and vanishes; no channel ever connects."""
    out = tmp_path / "out"
    addr = f"tcp:127.0.0.1:{free_port()}"
    recv = recv_proc(out, addr, "--timeout", "2")
    main = connect_when_listening(addr)
    main.sendall(hello_frame(channels=2))
    kind, _ = read_msg(main)
    assert kind is Msg.ACCEPT
    main.sendall(protocol.encode(Msg.DONE, {"digests": {"ram": "0" * 64}}))
    t = time.monotonic()
    rc, err = finish(recv, 12)
    main.close()
    assert time.monotonic() - t < 8  # about twice --timeout, with room for a loaded machine
    assert rc == 1
    one_line_error(err, "channels to connect: 0 of 2 connected")
    assert list(out.iterdir()) == []


def test_a_sync_no_round_pairs_with_fails_at_once() -> None:
    """One SYNC more than the main channel's ROUND markers (QEMU 9.0-9.2 sources send such a
    trailing SYNC; a native sender must not)."""
    served = Served({"timeout": 30.0})
    sender = RawSender(served, channels=1)
    sender.channels[0].sendall(wire.encode_sync_packet(1, PS))
    sender.main.sendall(protocol.encode(Msg.DONE, {"digests": {"ram": "0" * 64}}))
    t = time.monotonic()
    err = served.wait(20)
    assert time.monotonic() - t < 5  # not the 30 s timeout: the rule is checked at once
    assert isinstance(err, WireError), repr(err)
    assert "channel 0: a SYNC after the last round" in str(err)
    sender.close()
    assert_no_engine_threads()


# --------------------------------------------------------------------------- handshake


def _trickle(served: Served, data: bytes, every: float, stop: threading.Event,
             burst: int = 0) -> None:
    """Send ``data[:burst]`` at once, then a byte every ``every`` seconds."""
    s = served.connect()
    try:
        s.sendall(data[:burst])
        for i in range(burst, len(data)):
            if stop.wait(every):
                break
            s.sendall(data[i : i + 1])
    except OSError:
        pass
    finally:
        stop.wait(30)
        s.close()


@pytest.mark.parametrize("stall", ["hello", "probe"])
def test_a_trickling_peer_neither_holds_the_receiver_nor_blocks_a_sender(stall: str) -> None:
    """A peer that trickles its HELLO a byte at a time, or sends empty PROBE frames forever,
    has one deadline for its whole handshake; a real sender is served meanwhile."""
    served = Served({"timeout": 20.0, "handshake_timeout": 1.5})
    stop = threading.Event()
    if stall == "hello":
        data, every, burst = hello_frame(), 0.3, 6  # its session magic is in at once
    else:
        data, every, burst = frame(Msg.PROBE, b"") * 200, 0.02, 12
    t = threading.Thread(target=_trickle, args=(served, data, every, stop, burst), daemon=True)
    t.start()
    time.sleep(0.5)  # the trickler is first
    block = random_block()
    started = time.monotonic()
    stats = send_session([block], served.addr, method="none", channels=2, timeout=10)
    took = time.monotonic() - started
    stop.set()
    assert served.wait() is None and stats.normal_pages == 64
    assert took < 5, took
    t.join(5)


def test_a_trickling_peer_alone_is_refused_at_its_deadline() -> None:
    served = Served({"timeout": 20.0, "handshake_timeout": 1.0})
    stop = threading.Event()
    t = threading.Thread(target=_trickle, args=(served, hello_frame(), 0.15, stop),
                         daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not served.session.rejected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("not complete by its deadline" in r for r in served.session.rejected), \
        served.session.rejected
    stop.set()
    stats = send_session([random_block()], served.addr, method="none", channels=1, timeout=10)
    assert served.wait() is None and stats.normal_pages == 64


# --------------------------------------------------------------------------- memory


def test_receive_memory_is_checked_against_max_memory() -> None:
    require_method("zlib")
    served = Served({"max_memory": 16 << 20})
    with pytest.raises(MultiFDError, match="receiver refused the session.*64 channels of zlib "
                                           "need up to .* MiB of receive memory.*--max-memory "
                                           "16 MiB"):
        send_session([random_block()], served.addr, method="zlib", channels=64, timeout=10)
    err = served.wait()
    assert isinstance(err, NegotiationError)
    assert served.session.blocks == []
    # The same session fits a budget that covers it.
    served = Served({"max_memory": 256 << 20})
    stats = send_session([random_block()], served.addr, method="zlib", channels=64, timeout=20)
    assert served.wait() is None and stats.channels == 64


def test_recv_max_memory_on_the_command_line(tmp_path: Path) -> None:
    require_method("zlib")
    out = tmp_path / "out"
    addr = f"tcp:127.0.0.1:{free_port()}"
    recv = recv_proc(out, addr, "--timeout", "10", "--max-memory", "512K")
    img = tmp_path / "ram.img"
    img.write_bytes(random_block().array.tobytes())
    send = subprocess.run([*CLI, "send", f"ram={img}", addr, "--compression", "zlib",
                           "--channels", "8", "--connect-timeout", "20"],
                          capture_output=True, text=True, timeout=60)
    rc, err = finish(recv, 30)
    assert rc == 1 and send.returncode == 1
    one_line_error(err, "8 channels of zlib need up to", "--max-memory 0 MiB")
    assert list(out.iterdir()) == []


def test_zstd_decoder_window_is_the_senders_level() -> None:
    """A receiver told the sender's level refuses a frame with a larger window (a peer
    cannot make it hold 32 MiB per channel by asking)."""
    require_method("zstd")
    import zstandard

    from multifd_core.engine.harness import MethodHarness
    from multifd_core.methods.method import MethodOptions
    from multifd_zstd import MAX_WINDOW, Zstd

    assert Zstd(MethodOptions(level=1)).window == 1 << 19
    assert Zstd(MethodOptions()).window == MAX_WINDOW  # level unknown (a QEMU capture)
    assert Zstd(MethodOptions(level=1)).recv_memory() < 3 << 20
    assert Zstd(MethodOptions()).recv_memory() > MAX_WINDOW
    # A level-19 frame (8 MiB window) against a receiver at level 1.
    pages = np.random.default_rng(2).integers(0, 4, (128, PS), np.uint8)
    enc = zstandard.ZstdCompressor(level=19, write_content_size=False).compressobj()
    payload = enc.compress(pages.tobytes()) + enc.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    harness = MethodHarness(Zstd(MethodOptions(level=1)))
    with pytest.raises(MultiFDError, match="decompressStream"):
        harness.decode(payload, 128)
    harness.close()


# --------------------------------------------------------------------------- small ones


def test_one_file_descriptor_per_block(tmp_path: Path) -> None:
    from netkit import open_fds

    output = FileOutput(tmp_path / "out")
    before = open_fds()
    for i in range(10):
        output.allocate(f"b{i}", 4 * PS, PS)
    assert open_fds() - before == 10
    output.discard()
    assert open_fds() == before - 1  # and the directory's own


def _limit_fds(n: int):  # noqa: ANN202
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return apply


def test_too_many_blocks_for_the_open_file_limit(tmp_path: Path) -> None:
    """300 blocks and 2 channels under a 256 open-file limit: one line, nothing left."""
    out = tmp_path / "out"
    addr = f"tcp:127.0.0.1:{free_port()}"
    recv = recv_proc(out, addr, "--timeout", "10", preexec_fn=_limit_fds(256))
    main = connect_when_listening(addr)
    main.sendall(hello_frame(channels=2, blocks=[(f"b{i}", PS) for i in range(300)]))
    kind, body = read_msg(main)
    rc, err = finish(recv, 30)
    main.close()
    assert kind is Msg.REFUSE and "open files" in body["reason"], body
    assert rc == 1
    one_line_error(err, "needs 302 more open files", "ulimit -n")
    assert list(out.iterdir()) == []


def test_long_utf8_block_names_fit_a_file_name(tmp_path: Path) -> None:
    name = "\u20ac" * 80  # 240 bytes of UTF-8: a valid ramblock name
    assert len(block_file_name(0, name).encode()) + len(".partial") <= 255
    served_out = FileOutput(tmp_path / "out")
    served = Served({"timeout": 10.0, "on_verified": lambda st: served_out.commit(st.digests)},
                    allocate=served_out.allocate)
    block = random_block(name)
    send_session([block], served.addr, method="none", channels=1, timeout=10)
    assert served.wait() is None
    served_out.close()
    files = [p for p in (tmp_path / "out").iterdir() if p.name != "manifest.json"]
    assert len(files) == 1 and files[0].read_bytes() == block.array.tobytes()


def test_control_characters_in_block_names_are_escaped(tmp_path: Path) -> None:
    hostile = "\x1b[2J\x1b]0;pwned\x07\nline2\tx/../y"
    fname = block_file_name(2, hostile)
    assert fname.isprintable() and "/" not in fname and "\x1b" not in fname
    out = tmp_path / "out"
    (out / f"{fname}.partial").mkdir(parents=True)  # so the error names the block's file
    output = FileOutput(out)
    # A 3rd block so the index matches; the first two are ordinary.
    output.allocate("a", PS, PS)
    output.allocate("b", PS, PS)
    with pytest.raises(MultiFDError) as err:
        output.allocate(hostile, PS, PS)
    assert str(err.value).isprintable(), repr(str(err.value))
    output.discard()


def test_a_failed_recv_removes_an_earlier_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"blocks": []}\n')
    addr = f"tcp:127.0.0.1:{free_port()}"
    recv = recv_proc(out, addr, "--timeout", "5")
    main = connect_when_listening(addr)
    main.sendall(hello_frame(page_size=3000))  # refused
    read_msg(main)
    rc, err = finish(recv, 30)
    main.close()
    assert rc == 1 and "page_size" in err
    assert not (out / "manifest.json").exists()


def test_recv_keeps_a_file_that_is_not_a_socket_at_its_unix_path(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("data")
    proc = subprocess.run([*CLI, "recv", "--listen", f"unix:{path}", "--out",
                           str(tmp_path / "out"), "--timeout", "1"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    one_line_error(proc.stderr, "not a socket")
    assert path.read_text() == "data"


def test_recv_replaces_a_stale_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    from multifd_core.session.transport import Address, listen

    lst = listen(Address("unix", path=path))
    lst.close()
    live = listen(Address("unix", path=path))
    try:
        with pytest.raises(TransportError, match="another process is listening"):
            listen(Address("unix", path=path))
    finally:
        live.close()
