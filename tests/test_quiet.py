"""The benchmarks' wait for a quiet machine between two servers' runs, on recorded /proc/stat samples."""

from benchmarks.quiet import cpu_times, wait_until_quiet


def stat(busy: int, idle: int) -> str:
    """A /proc/stat whose cpu line has `busy` user jiffies and `idle` idle ones (the rest 0)."""
    return f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 0 0 1 0 0 0 0 0 0\n"


def test_cpu_times_counts_idle_and_iowait_as_not_busy():
    assert cpu_times("cpu  10 2 3 40 5 1 1 0 7 0\n") == (17, 62)


def test_waits_while_the_machine_is_busy_then_stops_once_a_window_is_quiet():
    # Jiffies: two busy windows (90% and 60%), then a quiet one (10%).
    samples = iter([stat(0, 0), stat(90, 10), stat(150, 50), stat(160, 140)])
    waited = wait_until_quiet(busy_below=0.25, window_s=0.5, read_stat=lambda: next(samples), sleep=lambda _: None)
    assert waited == 1.5


def test_gives_up_after_the_timeout_on_a_machine_that_stays_busy():
    counter = iter(range(0, 10_000, 100))
    busy_only = (stat(next(counter), 0) for _ in iter(int, 1))
    waited = wait_until_quiet(window_s=1.0, timeout_s=3.0, read_stat=lambda: next(busy_only), sleep=lambda _: None)
    assert waited == 3.0


def test_a_machine_without_proc_stat_does_not_wait():
    def missing() -> str:
        raise OSError("no /proc")
    assert wait_until_quiet(read_stat=missing, sleep=lambda _: None) == 0.0
