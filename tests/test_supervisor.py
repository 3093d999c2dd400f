"""The launcher's loop with fake servers and probes: signals end every wait, failed probes never end it."""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import types
import urllib.error

import pytest

from flover_backend.server import stop_signals, supervisor
from flover_backend.server.capped_log import CappedLog, RepeatedLines
from flover_backend.server.process import StartInterrupted
from flover_backend.server.stop_signals import StopSignals
from flover_backend.server.supervisor import probe_delay, supervise
from flover_backend.server.watchdog import WatchdogGaveUp
from tests.test_server_process import HTTP_SERVER, Server, group_alive
from tests.waiting import wait_for


def signal_main_thread(sig: signal.Signals = signal.SIGTERM) -> None:
    """Deliver `sig` to the main thread, wherever it is (the kernel interrupts its system call)."""
    signal.pthread_kill(threading.main_thread().ident, sig)


@pytest.fixture
def selects(monkeypatch):
    """Every select StopSignals.wait makes: an event set on entering it, and what each returned."""
    entered, returned = threading.Event(), []

    def spy(*args):
        entered.set()
        result = select.select(*args)
        returned.append(result[0])
        return result

    monkeypatch.setattr(stop_signals, "select", types.SimpleNamespace(select=spy))
    return types.SimpleNamespace(entered=entered, returned=returned)


def when(event: threading.Event, action) -> threading.Thread:
    """Run `action` on a thread once `event` is set (within a generous bound)."""
    thread = threading.Thread(target=lambda: event.wait(60) and action(), daemon=True)
    thread.start()
    return thread


class FakeServer:
    """A server that keeps running for `num_polls` polls, then exits with 99; `on_poll` runs at each poll."""

    def __init__(self, num_polls: int = 1000, on_poll=None):
        self.num_polls, self.on_poll, self.polls = num_polls, on_poll, 0

    def poll(self) -> int | None:
        self.polls += 1
        if self.on_poll:
            self.on_poll()
        return 99 if self.polls >= self.num_polls else None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_the_idle_wait_wakes_it(monkeypatch, selects, sig):
    monkeypatch.setattr(supervisor, "POLL_S", 30.0)  # so only the signal can end the wait early
    with StopSignals() as stop:
        when(selects.entered, lambda: signal_main_thread(sig))
        assert supervise(FakeServer(num_polls=2), stop) is None
    assert stop.signum == sig
    assert selects.returned[-1], "the select ran out its timeout: the signal did not wake it"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_a_signal_inside_the_servers_poll_stops_at_the_next_wait(monkeypatch):
    monkeypatch.setattr(supervisor, "POLL_S", 30.0)
    with StopSignals() as stop:
        assert supervise(FakeServer(num_polls=2, on_poll=signal_main_thread), stop) is None


def test_a_signal_inside_a_probe_that_never_returns_still_stops(monkeypatch):
    """A reload can take minutes: the stop does not wait for it (the server is stopped under it)."""
    monkeypatch.setattr(supervisor, "POLL_S", 30.0)
    monkeypatch.setattr(supervisor, "CLOSE_WAIT_S", 0.1)
    inside, release = threading.Event(), threading.Event()

    class StuckWatchdog:
        def check(self):
            inside.set()
            signal_main_thread()
            release.wait(60)

    try:
        with StopSignals() as stop:
            assert supervise(FakeServer(), stop, StuckWatchdog, interval_s=0.01) is None
        assert inside.is_set() and not release.is_set()  # stopped while the probe was still inside
    finally:
        release.set()


def test_the_stop_waits_for_a_short_probe_under_way(monkeypatch):
    """A probe still running while tritonserver unloads its models on the way out would take them for broken."""
    monkeypatch.setattr(supervisor, "POLL_S", 30.0)
    finished = []
    with StopSignals() as stop:

        class SlowWatchdog:
            def check(self):
                signal_main_thread()
                assert wait_for(lambda: stop.requested)
                sum(range(2_000_000))  # the rest of the probe, after the stop was requested
                finished.append(True)

        assert supervise(FakeServer(), stop, SlowWatchdog, interval_s=0.01) is None
        assert finished == [True]


def test_a_signal_while_the_server_starts_stops_it(tmp_path, selects):
    server = Server(tmp_path, "import time; time.sleep(60)", ready_timeout_s=60.0)
    with StopSignals() as stop:
        server.interrupt = stop.wait
        when(selects.entered, signal_main_thread)
        with pytest.raises(StartInterrupted):
            server.start()
    assert server.poll() is not None and not group_alive(server.process.pid)


def test_a_signal_while_a_server_stops_lets_the_stop_finish(tmp_path, monkeypatch):
    """A second Ctrl-C while the server drains must not abandon the stop half way (and leak the server)."""
    deaf = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)" + HTTP_SERVER  # waits out its SIGINT
    server = Server(tmp_path, deaf)
    server.stop_signals = ((signal.SIGINT, 1.0), (signal.SIGKILL, 5.0))
    stopping = threading.Event()
    stopped = server._stopped
    monkeypatch.setattr(server, "_stopped", lambda: stopping.set() or stopped())
    with StopSignals() as stop:
        server.start()
        stopping.clear()
        when(stopping, signal_main_thread)
        assert server.stop() == -signal.SIGKILL
    assert stop.requested and not group_alive(server.process.pid)


def test_failed_probes_are_counted_and_retried_with_backoff(monkeypatch, caplog):
    monkeypatch.setattr(supervisor, "POLL_S", 0.05)
    delays = []
    monkeypatch.setattr(supervisor, "probe_delay", lambda interval, failures: delays.append(failures) or 0.01)
    # What a server out of file descriptors gives: nothing, refusals, half replies; the first from building it.
    errors = [TimeoutError("timed out"), urllib.error.URLError(ConnectionResetError()), ConnectionRefusedError(),
              ValueError("Expecting value: line 1 column 1")]
    calls = []

    class FlakyWatchdog:
        def __init__(self):
            if not calls:
                calls.append("init")
                raise TimeoutError("the model index did not answer")

        def check(self):
            calls.append("check")
            if errors:
                raise errors.pop(0)
            if calls.count("check") == 6:
                signal_main_thread()

    caplog.set_level(logging.WARNING, logger=supervisor.__name__)
    with StopSignals() as stop:
        assert supervise(FakeServer(), stop, FlakyWatchdog, interval_s=0.01) is None
    assert calls == ["init", "check", "check", "check", "check", "check", "check"]
    assert delays == [1, 2, 3, 4, 5]  # one more failure in a row each time, then none after the success
    assert "health probe failed (5 in a row): ValueError" in caplog.text
    assert "answered again after 5 failures" in caplog.text


def test_probe_delay_doubles_up_to_its_cap():
    assert [probe_delay(5.0, n) for n in range(6)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert probe_delay(5.0, 10_000) == 60.0
    assert probe_delay(120.0, 3) == 120.0  # an interval above the cap is kept


def test_a_watchdog_that_gives_up_ends_the_supervisor(monkeypatch):
    monkeypatch.setattr(supervisor, "POLL_S", 0.05)

    class HopelessWatchdog:
        def check(self):
            raise WatchdogGaveUp("model 'm' is broken")

    with StopSignals() as stop, pytest.raises(WatchdogGaveUp, match="'m'"):
        supervise(FakeServer(), stop, HopelessWatchdog, interval_s=0.01)


def test_a_server_that_exits_ends_the_supervisor_with_its_code(monkeypatch):
    monkeypatch.setattr(supervisor, "POLL_S", 0.01)
    with StopSignals() as stop:
        assert supervise(FakeServer(num_polls=3), stop) == 99


def test_capped_log_keeps_at_most_two_files_of_its_cap_and_the_latest_lines(tmp_path):
    read_end, write_end = os.pipe()
    log = CappedLog(read_end, tmp_path / "server.log", max_bytes=64 << 10).start()
    lines = [b"E1204 12:00:00.000000 1 http_server.cc:1] Error from accept() call: Too many open files %d\n" % i
             for i in range(50_000)]  # ~4.5 MB
    with os.fdopen(write_end, "wb") as writer:
        writer.write(b"".join(lines))
    log.join(timeout_s=60)
    current, rotated = tmp_path / "server.log", tmp_path / "server.log.1"
    assert current.stat().st_size <= 64 << 10 and rotated.stat().st_size <= 64 << 10
    assert log.num_rotations > 60
    assert (rotated.read_bytes() + current.read_bytes()).endswith(b"".join(lines[-100:]))


def test_repeated_lines_collapse_into_a_count_wherever_the_chunks_split():
    flood = b"[warn] Error from accept() call: Too many open files\n"
    data = b"started\n" + flood * 5000 + b"recovered\n" + flood * 2 + b"last, unfinished"
    for size in (1, 7, 4096, len(data)):
        repeats = RepeatedLines()
        out = b"".join(repeats.feed(data[i:i + size]) for i in range(0, len(data), size)) + repeats.finish()
        assert out == (b"started\n" + flood + b"[the line above repeated 4999 more times]\n" + b"recovered\n" + flood
                       + b"[the line above repeated 1 more times]\n" + b"last, unfinished")


def test_a_flood_of_one_line_leaves_the_log_small_and_its_start_in_place(tmp_path):
    read_end, write_end = os.pipe()
    log = CappedLog(read_end, tmp_path / "server.log", max_bytes=64 << 10).start()
    with os.fdopen(write_end, "wb") as writer:
        writer.write(b"server started\n" + b"[warn] Error from accept() call: Too many open files\n" * 200_000)
    log.join(timeout_s=60)
    text = (tmp_path / "server.log").read_bytes()
    assert text.startswith(b"server started\n") and text.endswith(b"repeated 199999 more times]\n")
    assert len(text) < 200 and log.num_rotations == 0 and log.num_bytes_read > 10_000_000
