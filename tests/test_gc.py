"""tasks/_gc.py: the collector paused while big answers are parsed, and always given back."""

from __future__ import annotations

import gc
import threading

import pytest

from tasks._gc import gc_paused


@pytest.fixture(autouse=True)
def _collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_pauses_nest_and_the_last_one_enables_it_again():
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled(), "the inner pause ended, the outer one still holds"
    assert gc.isenabled()


def test_overlapping_pauses_in_threads_end_with_the_collector_on():
    inside, release = threading.Barrier(3), threading.Event()
    seen: list[bool] = []

    def hold(wait: bool) -> None:
        with gc_paused():
            inside.wait(timeout=10)
            if wait:
                release.wait(timeout=10)
            seen.append(gc.isenabled())

    early, late = threading.Thread(target=hold, args=(False,)), threading.Thread(target=hold, args=(True,))
    early.start(), late.start()
    inside.wait(timeout=10)
    early.join(timeout=10)
    assert not gc.isenabled(), "one thread's pause ended while the other's still holds"
    release.set()
    late.join(timeout=10)
    assert seen == [False, False] and gc.isenabled()


def test_an_error_inside_gives_the_collector_back():
    with pytest.raises(RuntimeError, match="boom"), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_the_caller_turned_off_stays_off():
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()
