"""Every torch call of an engine runs on its one thread: loading, hand-driven steps and the loop alike."""

import threading

import pytest

from flover_backend import Engine, SamplingParams
from flover_backend.engine.thread import EngineThread
from flover_backend.errors import EngineDeadError
from flover_backend.execution.model_runner import ModelRunner
from tests.test_engine import engine_config
from tests.waiting import wait_for


def test_calls_run_in_order_on_the_thread_and_errors_reach_the_caller():
    worker = EngineThread(name="test-engine-thread")
    try:
        seen = []
        futures = [worker.submit(lambda i=i: seen.append((i, threading.current_thread().name))) for i in range(5)]
        for future in futures:
            future.result()
        assert seen == [(i, "test-engine-thread") for i in range(5)]
        with pytest.raises(ZeroDivisionError):
            worker.call(lambda: 1 / 0)
        assert worker.call(lambda: worker.call(lambda: 7)) == 7  # a call from the thread itself runs at once
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.call(lambda: None)


def test_loading_and_every_iteration_run_on_the_engine_thread(monkeypatch):
    threads = {"load": set(), "execute": set()}
    load, execute = ModelRunner.__init__, ModelRunner.execute

    def recording_load(self, *args, **kwargs):
        threads["load"].add(threading.current_thread())
        load(self, *args, **kwargs)

    def recording_execute(self, out):
        threads["execute"].add(threading.current_thread())
        return execute(self, out)

    monkeypatch.setattr(ModelRunner, "__init__", recording_load)
    monkeypatch.setattr(ModelRunner, "execute", recording_execute)
    engine = Engine(engine_config())
    engine.add_request("by hand", SamplingParams(max_tokens=3, ignore_eos=True), on_output=lambda _: None)
    engine.run_until_idle()  # steps driven from this thread
    engine.start()
    assert len(list(engine.generate("in the loop", SamplingParams(max_tokens=3, ignore_eos=True)))) == 3
    engine.stop()
    (loader,) = threads["load"]
    assert threads["execute"] == {loader} and loader is not threading.main_thread()
    assert not loader.is_alive()  # stop() ends it


def test_call_runs_on_the_engine_thread_before_and_while_the_loop_runs():
    engine = Engine(engine_config())
    before = engine.call(threading.current_thread)
    engine.start()
    try:
        outputs = engine.generate("beside the loop", SamplingParams(max_tokens=4, ignore_eos=True))
        assert engine.call(threading.current_thread) is before is not threading.current_thread()
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0)
        assert len(list(outputs)) == 4  # the loop goes on around the calls
        from_callback = []
        engine.add_request("from a callback", SamplingParams(max_tokens=1, ignore_eos=True),
                           on_output=lambda _: from_callback.append(engine.call(threading.current_thread)))
        assert wait_for(lambda: from_callback == [before])  # on the loop thread itself: run at once, no deadlock
    finally:
        engine.stop()
    with pytest.raises(EngineDeadError):
        engine.call(lambda: None)
    engine.stop()  # again: nothing left to stop
