"""Acceptance: an aiortc client on loopback against `wanstream serve --demo`."""

from __future__ import annotations

import asyncio
import time

from server.harness import (
    ServerProcess,
    describe,
    leaks,
    resources,
    settled_resources,
    wait_for,
    wait_sessions,
)
from server.rtc_client import RtcClient, SyntheticCamera

FIRST = "a watercolor painting of a quiet harbour"
SECOND = "a neon city at night, cyberpunk"


async def _one_cycle(server: ServerProcess) -> None:
    async with server.async_client() as http:
        client = RtcClient(http, camera=SyntheticCamera(fps=30))
        await client.connect(prompts=[FIRST])
        await client.wait_frames(5)
        await client.close()
        await wait_sessions(http, 0)


def test_stream_prompt_switch_and_clean_teardown(server: ServerProcess) -> None:
    """Stream 3 s of camera frames, get frames of the stream's size back, switch the prompt over the
    data channel, see the switch in the event log (and no old-prompt frame after the cut), disconnect,
    and find the server's threads, tasks, files and memory back at their baseline."""
    asyncio.run(_one_cycle(server))  # warm-up: lazy imports, codec and executor threads
    with server.client() as c:
        baseline = resources(c)

    async def run() -> None:
        async with server.async_client() as http:
            camera = SyntheticCamera(fps=30, height=240, width=320)
            client = RtcClient(http, camera=camera)
            session_id = await client.connect(prompts=[FIRST])
            # 3 s of camera at 30 fps, however long the client's encoder takes on a loaded CPU.
            await wait_for(lambda: camera.sent >= 90, timeout=60, what="90 camera frames sent")
            await client.wait_frames(12)
            status = (await http.get(f"/api/v1/sessions/{session_id}")).json()
            height, width = status["settings"]["height"], status["settings"]["width"]
            assert (height, width) == (128, 128)  # the server's --height/--width; the camera is 240×320
            assert {(w, h) for _, w, h in client.frames} == {(width, height)}

            ack = await client.send({"id": "switch", "prompts": [SECOND], "switch": "cut"})
            assert ack["type"] == "ack" and ack["restarted"] is True and ack["flushed"] is True, ack
            received = len(client.frames)
            await client.wait_frames(received + 12)

            events = (await http.get(f"/api/v1/sessions/{session_id}/events")).json()
            control = next(e for e in events if e["type"] == "control" and e["id"] == "switch")
            chunks = [e for e in events if e["type"] == "chunk"]
            before = [e for e in chunks if e["seq"] < control["seq"]]
            after = [e for e in chunks if e["seq"] > control["seq"]]
            assert before and after
            assert {e["prompt"][0][0] for e in before} == {FIRST}
            assert {e["prompt"][0][0] for e in after} == {SECOND}
            assert after[0]["chunk"] >= ack["next_chunk"] and after[0]["stream_start"]

            # What was actually sent: nothing of the old epoch after the cut's epoch started.
            status = (await http.get(f"/api/v1/sessions/{session_id}")).json()
            sent = status["output"]["sent_log"]  # [epoch, chunk, prompt]
            first_new = next(i for i, (epoch, _, _) in enumerate(sent) if epoch == ack["epoch"])
            assert all(prompt == FIRST for epoch, _, prompt in sent[:first_new])
            assert all(epoch == ack["epoch"] and prompt == SECOND for epoch, _, prompt in sent[first_new:])

            await client.close()
            await wait_sessions(http, 0)

    asyncio.run(run())
    with server.client() as c:
        after = settled_resources(c, baseline)
    print(f"\nacceptance: before {describe(baseline)}\n            after  {describe(after)}")
    assert leaks(baseline, after) == [], (baseline, after)


def test_rejected_updates_leave_the_stream_untouched(server: ServerProcess) -> None:
    """Malformed, unknown and out-of-range updates (data channel and REST) get the reason; nothing changes
    and frames keep coming."""

    async def run() -> None:
        async with server.async_client() as http:
            client = RtcClient(http, camera=SyntheticCamera(fps=30))
            session_id = await client.connect(prompts=[FIRST])
            await client.wait_frames(5)
            url = f"/api/v1/sessions/{session_id}"
            settings_before = (await http.get(url)).json()["settings"]

            cases = [
                ("{not json", "not JSON"),
                ({"id": 1, "noise_scale": 5}, "noise_scale"),
                ({"id": 2, "steps": [500, 700]}, "descending"),
                ({"id": 3, "steps": []}, "empty"),
                ({"id": 4, "seed": -3}, "seed"),
                ({"id": 5, "colour": "red"}, "colour"),
                ({"id": 6, "prompts": [""]}, "empty"),
                ({"id": 7, "prompts": [{"text": "x", "weight": -1}]}, "weight"),
                ({"id": 8, "transition": {"steps": 4}}, "transition needs prompts"),
                ({"id": 9, "height": 100}, "multiple of 16"),
                ({"id": 10, "sink_frames": 9}, "sink_frames"),
                ([1, 2, 3], "should be an object"),
            ]
            for message, reason in cases:
                reply = await client.send(message)
                assert reply["type"] == "error" and reason in reply["error"], (message, reply)
                if isinstance(message, dict):
                    assert reply["id"] == message["id"]
            for message, reason in cases[1:]:
                response = await http.post(f"{url}/control", json=message)
                assert response.status_code == 422, (message, response.text)
                assert reason in str(response.json()["detail"]), (message, response.text)

            status = (await http.get(url)).json()
            assert status["settings"] == settings_before
            assert status["prompts"] == [[FIRST, 1.0]]
            assert status["stats"]["epoch"] == 0 and status["stats"]["state"] == "running"
            received = len(client.frames)
            await client.wait_frames(received + 8)  # still streaming

            # A valid update over REST is applied between chunks and acknowledged.
            ack = (await http.post(f"{url}/control", json={"seed": 7, "noise_scale": 0.6})).json()
            assert ack["type"] == "ack" and ack["applied"] == ["noise_scale", "seed"]
            status = (await http.get(url)).json()
            assert status["settings"]["seed"] == 7 and status["settings"]["noise_scale"] == 0.6
            await client.close()
            await wait_sessions(http, 0)

    asyncio.run(run())


def test_text_mode_is_send_only(server: ServerProcess) -> None:
    """No camera: the client only receives; frames come at the text-mode content rate."""

    async def run() -> None:
        async with server.async_client() as http:
            client = RtcClient(http, camera=None)
            session_id = await client.connect(prompts=[FIRST], settings={"mode": "text"})
            await client.wait_frames(16)
            events = (await http.get(f"/api/v1/sessions/{session_id}/events")).json()
            assert {e["kind"] for e in events if e["type"] == "chunk"} == {"text"}
            ack = await client.send({"id": "p", "prompts": [SECOND], "transition": {"steps": 2}})
            assert ack["type"] == "ack" and ack["restarted"] is False and ack["flushed"] is False
            # A transition keeps the stream (no restart, no flush) and blends over the next chunks.
            received = len(client.frames)
            await client.wait_frames(received + 12)
            # Chunks are logged when their frames leave the engine, and text mode works ahead of the clock:
            # wait until the log reaches a chunk made under the new prompt alone, however slow the CPU.
            deadline = time.monotonic() + 60
            while True:
                events = (await http.get(f"/api/v1/sessions/{session_id}/events")).json()
                control = next(e for e in events if e["type"] == "control" and e["id"] == "p")
                after = [e for e in events if e["type"] == "chunk" and e["seq"] > control["seq"]]
                if any(e["prompt"] == [[SECOND, 1.0]] for e in after):
                    break
                assert time.monotonic() < deadline, f"no chunk under the new prompt alone: {after}"
                await asyncio.sleep(0.1)
            assert any(e["transition_left"] > 0 for e in after)
            assert after[-1]["prompt"] == [[SECOND, 1.0]]
            assert not any(e["stream_start"] for e in after)
            await client.close()
            await wait_sessions(http, 0)

    asyncio.run(run())


def test_video_stream_needs_a_camera(server: ServerProcess) -> None:
    async def run() -> None:
        async with server.async_client() as http:
            client = RtcClient(http, camera=None)
            response = await client.offer(prompts=[FIRST])
            assert response.status_code == 400
            assert "sends none" in response.json()["detail"]
            await client.close()
            await wait_sessions(http, 0)

    asyncio.run(run())
