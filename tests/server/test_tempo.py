"""Beat sync on a simulated clock: the tempo's beats, tap tempo, and a quantised prompt change landing on
the chunk nearest the downbeat (Ableton Link is never switched on here: it announces itself by multicast)."""

from __future__ import annotations

import time

import pytest

from wanstream.engine.prompts import WeightedPrompt
from wanstream.engine.settings import StreamSettings
from wanstream.pipeline import Pipeline
from wanstream.server.schemas import Control
from wanstream.server.tempo import Tempo, TempoUpdate, lands, next_boundary, tap_tempo
from wanstream.server.worker import EngineWorker


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_boundaries_and_chunk_mapping() -> None:
    assert next_boundary(0.0, 4) == 0.0
    assert next_boundary(0.1, 4) == 4.0
    assert next_boundary(3.9999999, 4) == 4.0  # within rounding of a downbeat: on it
    assert next_boundary(5.2, 1) == 6.0
    # chunks of 0.25 s: a change due at 2.0 lands on the chunk starting nearest to it
    assert not lands(1.75, 0.25, 2.0)
    assert lands(1.875, 0.25, 2.0)
    assert lands(2.0, 0.25, 2.0)
    assert tap_tempo([0.0]) is None
    assert tap_tempo([0.0, 0.5, 1.0, 1.5]) == pytest.approx(120.0)


def test_tempo_beats_bpm_changes_and_taps() -> None:
    clock = FakeClock()
    tempo = Tempo(bpm=120, quantum=4, clock=clock)
    origin = clock.t
    clock.t += 1.25
    assert tempo.beat_at(clock.t) == pytest.approx(2.5)
    assert tempo.due("beat", clock.t) == pytest.approx(origin + 1.5)
    assert tempo.due("bar", clock.t) == pytest.approx(origin + 2.0)
    assert tempo.due("off", clock.t) is None
    tempo.update(TempoUpdate(bpm=60, quantize="bar"))  # the current beat stays where it is
    assert tempo.beat_at(clock.t) == pytest.approx(2.5)
    assert tempo.due("bar", clock.t) == pytest.approx(clock.t + 1.5)
    assert tempo.quantize == "bar"
    # Four taps 0.4 s apart: 150 BPM, the first tap a downbeat
    first = clock.t = 200.0
    for _ in range(4):
        tempo.tap()
        clock.t += 0.4
    assert tempo.bpm == pytest.approx(150.0)
    assert tempo.beat_at(first) == pytest.approx(0.0)
    assert tempo.status().phase == pytest.approx((clock.t - first) * 2.5 % 4, abs=1e-3)
    clock.t += 5  # a long pause starts a new series: one tap alone keeps the tempo, sets the downbeat
    assert tempo.tap() is None and tempo.bpm == pytest.approx(150.0)
    assert tempo.beat_at(clock.t) == pytest.approx(0.0)


def test_link_without_its_package_is_refused_and_changes_nothing() -> None:
    try:
        import aalink  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("aalink is installed: switching Link on would join the LAN's Link session by multicast")
    tempo = Tempo()
    with pytest.raises(RuntimeError, match=r"wanstream\[link\]"):
        tempo.update(TempoUpdate(link=True, bpm=90))
    assert tempo.bpm == 120 and tempo.status().link is False and "link" in (tempo.status().link_error or "")


def _wait(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_quantised_prompt_change_lands_on_the_chunk_nearest_the_downbeat() -> None:
    clock = FakeClock(100.0)
    tempo = Tempo(bpm=120, quantum=4, clock=clock)  # downbeats every 2 s from t = 100
    settings = StreamSettings(height=64, width=64, mode="text", encoder="taehv", decoder="taehv")
    pipeline = Pipeline.demo()
    worker = EngineWorker(
        lambda: pipeline.session(settings, prompts=[WeightedPrompt(text="old")]),
        name="beats",
        text_fps=16.0,
        tempo=tempo,
        clock=clock,
    )
    worker.start().result(timeout=60)
    try:
        chunk_s = 4 / 16.0

        def caught_up() -> bool:  # text mode runs half a second of content ahead of its clock, then waits
            return worker._text_clock - clock.t > 0.5

        _wait(caught_up, "the first chunks")
        clock.t += 0.3
        settings_only = worker.control(Control(noise_scale=0.5, quantize=None))  # not quantised by default
        bar = worker.control(Control(prompts=[WeightedPrompt(text="new")], quantize="bar"))
        assert settings_only.result(timeout=60).applied == ["noise_scale"]
        while not bar.done():  # the simulated clock moves only once the worker has caught up with it
            _wait(lambda: caught_up() or bar.done(), "the worker to catch up")
            assert clock.t < 110, "the quantised change never landed"
            clock.t += 0.05
        ack = bar.result(timeout=60)
        row = next(e for e in worker.event_log() if e["type"] == "control" and e["applied"] == ["prompts"])
        assert row["due"] == pytest.approx(102.0)  # the next downbeat after the press (t = 100.3)
        # The chunk it lands on starts nearest the downbeat: not a chunk earlier, not a chunk later.
        assert 102.0 - chunk_s / 2 <= row["chunk_start"] < 102.0 + chunk_s / 2

        def logged() -> bool:
            return any(e["type"] == "chunk" and e["chunk"] >= ack.next_chunk for e in worker.event_log())

        while not logged():
            _wait(lambda: caught_up() or logged(), "the chunk after the change")
            assert clock.t < 110, "the chunk after the change never came"
            clock.t += 0.05
        chunks = {e["chunk"]: e for e in worker.event_log() if e["type"] == "chunk"}
        assert chunks[ack.next_chunk - 1]["prompt"][0][0] == "old"
        assert chunks[ack.next_chunk]["prompt"][0][0] == "new"
        # 'off' overrides the tempo's default: applied at once, with no due time
        tempo.update(TempoUpdate(quantize="bar"))
        now = worker.control(Control(prompts=[WeightedPrompt(text="now")], quantize="off"))
        assert now.result(timeout=60).applied == ["prompts"]
        assert "due" not in worker.event_log()[-1]
        # settings alone (an audio level driving the noise) are not held for the bar unless they ask
        assert worker.control(Control(noise_scale=0.6)).result(timeout=60).applied == ["noise_scale"]
    finally:
        worker.stop()
        assert worker.join(30)


class FakeLink:
    """Stands in for aalink.Link (the real one joins the LAN's Link session by multicast)."""

    instances: list[FakeLink] = []  # noqa: RUF012

    def __init__(self, bpm: float, loop: object) -> None:
        self.tempo, self.beat, self.quantum, self.enabled, self.num_peers = bpm, 0.0, 4, False, 2
        FakeLink.instances.append(self)


def test_link_is_followed_when_switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import sys
    import types

    monkeypatch.setitem(sys.modules, "aalink", types.SimpleNamespace(Link=FakeLink))
    clock = FakeClock()
    tempo = Tempo(bpm=100, quantum=3, clock=clock)
    loop = asyncio.new_event_loop()
    try:
        tempo.update(TempoUpdate(link=True), loop)
    finally:
        loop.close()
    link = FakeLink.instances[-1]
    assert link.enabled and link.quantum == 3 and link.tempo == 100
    link.tempo, link.beat = 140.0, 10.5  # another peer changed the tempo; the session is mid-bar
    assert tempo.beat_at(clock.t) == pytest.approx(10.5)
    assert tempo.due("bar", clock.t) == pytest.approx(clock.t + 1.5 * 60 / 140)  # beat 12: the next downbeat
    status = tempo.status()
    assert status.link and status.link_peers == 2 and status.bpm == 140 and status.phase == pytest.approx(1.5)
    tempo.update(TempoUpdate(bpm=90))  # a tempo set here goes to the Link session
    assert link.tempo == 90
    tempo.update(TempoUpdate(link=False))
    assert not link.enabled and not tempo.status().link


def test_the_server_timeline_player_sends_segments_seeks_and_loops() -> None:
    import asyncio
    import concurrent.futures
    import math

    from wanstream.server.playback import TimelinePlayer
    from wanstream.timeline import Segment, Timeline

    class Worker:
        def __init__(self) -> None:
            self.sent: list[str] = []

        def control(self, message: Control) -> concurrent.futures.Future[object]:
            self.sent.append(message.prompts[0].text if message.prompts else "")
            future: concurrent.futures.Future[object] = concurrent.futures.Future()
            future.set_result(None)
            return future

    timeline = Timeline(
        (
            Segment(0.0, 10.0, (WeightedPrompt(text="one"),)),
            Segment(10.0, 20.0, (WeightedPrompt(text="two"),), transition_steps=3),
        )
    )
    clock = FakeClock(0.0)
    worker = Worker()

    async def run() -> None:
        tasks: list[asyncio.Task[object]] = []

        def spawn(coro: object, name: str) -> asyncio.Task[object]:
            tasks.append(asyncio.get_running_loop().create_task(coro))  # type: ignore[arg-type]
            return tasks[-1]

        async def settle(count: int) -> None:
            for _ in range(1000):
                if len(worker.sent) >= count:
                    return
                await asyncio.sleep(0.001)
            raise AssertionError(f"expected {count} updates, got {worker.sent}")

        player = TimelinePlayer(timeline, worker, spawn, clock=clock)  # type: ignore[arg-type]
        player.play()
        await settle(1)
        assert worker.sent == ["one"] and player.status().segment == 0
        player.seek(12.0)  # wakes the player: the segment under the playhead is sent
        await settle(2)
        assert worker.sent == ["one", "two"] and player.status().position == pytest.approx(12.0)
        with pytest.raises(ValueError, match="seconds"):
            player.seek(math.nan)
        player.loop = True
        player.seek(21.0)  # past the end: a looping player starts again from the first segment
        await settle(3)
        assert worker.sent[-1] == "one" and player.playing
        player.stop()
        assert not player.playing and player.status().sent == 3
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
