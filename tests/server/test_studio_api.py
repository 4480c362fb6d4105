"""What the studio needs from the server beyond streaming: timeline import/export, the server's instance
id (a restart is noticed), and the model status fields (loaded autoencoders, the download command)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from starlette.testclient import TestClient

from wanstream.engine.prompts import DEFAULT_PROMPT
from wanstream.server.app import create_app
from wanstream.server.config import ServerConfig
from wanstream.server.model import ModelManager
from wanstream.timeline import load_timeline, parse_timeline

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("timeline-*.json"))
BASE = "http://127.0.0.1:8000"


def _client() -> TestClient:
    return TestClient(create_app(ServerConfig(demo=True, preload=False)), base_url=BASE)


def test_examples_import_as_generate_reads_them_and_export_back(tmp_path: Path) -> None:
    assert EXAMPLES, "examples/timeline-*.json are missing"
    with _client() as c:
        for path in EXAMPLES:
            r = c.post("/api/v1/timeline/parse", params={"name": path.name}, content=path.read_bytes())
            assert r.status_code == 200, r.text
            studio = r.json()
            expected = load_timeline(path)
            assert [s["start"] for s in studio["segments"]] == [s.start for s in expected.segments]
            assert [s["end"] for s in studio["segments"]] == [s.end for s in expected.segments]
            assert studio["segments"][0]["prompts"][0]["text"] == expected.segments[0].prompts[0].text
            assert studio["duration"] == expected.duration
            assert path.name in studio["source"]
            # The settings `wanstream generate` applies from the file (manageCache false → refresh).
            assert studio["stream_settings"] == expected.settings.to_update().model_dump(
                mode="json", exclude_unset=True
            )
            assert {
                "seed": 42,
                "steps": [700, 500],
                "noise_scale": 0.8,
                "noise_controller": False,
                "prompt_switch": "refresh",
            }.items() <= studio["stream_settings"].items()

            exported = c.post("/api/v1/timeline/export", json=studio)
            assert exported.status_code == 200, exported.text
            body = exported.json()
            assert body["version"] == "2.1"
            out = tmp_path / path.name
            out.write_text(json.dumps(body))
            again = load_timeline(out)
            assert again.segments == expected.segments
            assert again.settings == expected.settings


def test_a_workflow_file_imports() -> None:
    workflow = {
        "format": "scope-workflow",
        "pipelines": [{"pipeline_id": "streamdiffusionv2", "params": {"base_seed": 7, "noise_scale": 0.6}}],
        "timeline": {
            "entries": [
                {"start_time": 0, "end_time": 2, "prompts": [{"text": "a cat", "weight": 1}]},
                {
                    "start_time": 2,
                    "end_time": 5,
                    "prompts": [{"text": "a tiger", "weight": 1}],
                    "transition_steps": 3,
                    "temporal_interpolation_method": "slerp",
                },
            ]
        },
    }
    with _client() as c:
        r = c.post("/api/v1/timeline/parse", params={"name": "show.scope-workflow.json"}, json=workflow)
        assert r.status_code == 200, r.text
        studio = r.json()
    assert studio["segments"][1] == {
        "start": 2.0,
        "end": 5.0,
        "prompts": [{"text": "a tiger", "weight": 1.0}],
        "transition_steps": 3,
        "interpolation": "slerp",
    }
    assert {"seed": 7, "noise_scale": 0.6}.items() <= studio["stream_settings"].items()
    assert "steps" not in studio["stream_settings"]
    assert "Scope workflow" in studio["source"]


def test_bad_files_and_bad_exports_are_located() -> None:
    with _client() as c:
        r = c.post("/api/v1/timeline/parse", params={"name": "x.json"}, content=b"{not json")
        assert r.status_code == 422
        assert "not valid JSON" in r.json()["detail"]["error"]

        overlap = {
            "prompts": [
                {"startTime": 0, "endTime": 3, "prompts": [{"text": "a", "weight": 1}]},
                {"startTime": 2, "endTime": 4, "prompts": [{"text": "b", "weight": 1}]},
            ]
        }
        r = c.post("/api/v1/timeline/parse", json=overlap)
        assert r.status_code == 422
        assert r.json()["detail"]["problems"][0]["loc"] == "prompts[1].startTime"

        open_ended = {"segments": [{"start": 0, "end": None, "prompts": [{"text": "a cat"}]}]}
        r = c.post("/api/v1/timeline/export", json=open_ended)
        assert r.status_code == 422
        assert r.json()["detail"]["problems"][0]["loc"] == "segments[0].end"

        # Settings the engine would reject are caught on export, not in the user's later offline run.
        bad_steps = {
            "segments": [{"start": 0, "end": 2, "prompts": [{"text": "a cat"}]}],
            "settings": {"denoising_steps": [500, 700]},
        }
        r = c.post("/api/v1/timeline/export", json=bad_steps)
        assert r.status_code == 422
        assert r.json()["detail"]["problems"][0]["loc"] == "settings.denoisingSteps"

        too_big = c.post("/api/v1/timeline/parse", content=b" " * (2 * 1024 * 1024 + 1))
        assert too_big.status_code == 413


def test_recorded_timeline_exports_with_live_settings() -> None:
    recorded = {
        "segments": [
            {"start": 0, "end": 1.25, "prompts": [{"text": "a red fox", "weight": 1}]},
            {
                "start": 1.25,
                "end": 4.5,
                "prompts": [{"text": "a snow fox", "weight": 2}, {"text": "winter", "weight": 1}],
                "transition_steps": 4,
                "interpolation": "slerp",
            },
        ],
        "settings": {
            "pipeline_id": "streamdiffusionv2",
            "input_mode": "video",
            "height": 256,
            "width": 256,
            "seed": 9,
            "denoising_steps": [700, 500],
            "noise_scale": 0.7,
            "noise_controller": True,
            "manage_cache": False,
        },
    }
    with _client() as c:
        r = c.post("/api/v1/timeline/export", json=recorded)
    assert r.status_code == 200, r.text
    timeline = parse_timeline(r.json())
    assert [s.start for s in timeline.segments] == [0, 1.25]
    assert timeline.segments[1].transition_steps == 4
    assert timeline.settings.seed == 9 and timeline.settings.height == 256
    assert timeline.settings.to_update().prompt_switch == "refresh"


def test_health_names_the_server_instance() -> None:
    with _client() as c:
        first = c.get("/health").json()
        assert first["instance"] == c.get("/health").json()["instance"]
        assert first["started"] > 0
    with _client() as c:
        assert c.get("/health").json()["instance"] != first["instance"]  # a restart is a new instance


def test_model_status_gives_the_download_command_when_weights_are_missing(tmp_path: Path) -> None:
    model = ModelManager(demo=False, models_dir=tmp_path, device="cpu")
    model.start_load()
    status = model.wait(60)
    assert status.state == "error"
    assert status.download_command is not None and status.download_command.startswith("wanstream download")
    assert not status.demo and status.codecs == []


def test_model_status_lists_the_demo_codecs() -> None:
    model = ModelManager(demo=True, models_dir=None, device="cpu")
    model.start_load()
    status = model.wait(60)
    assert status.state == "loaded", status.error
    assert status.demo and sorted(status.codecs) == ["taehv", "wan"]
    assert status.download_command is None


def test_the_studio_is_served_at_the_root() -> None:
    with _client() as c:
        page = c.get("/")
        assert page.status_code == 200 and "<title>wanstream studio</title>" in page.text
        assert page.headers["cache-control"] == "no-cache"  # a new install's scripts are picked up at once
        script = c.get("/js/main.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]  # module scripts need a JavaScript type
        # Every module the page imports is there (a missing one would leave a blank page).
        static = Path(__file__).parents[2] / "src" / "wanstream" / "server" / "static"
        for path in static.rglob("*.js"):
            for name in re.findall(r'from "(\.\.?/[^"]+)"', path.read_text()):
                target = (path.parent / name).resolve()
                assert target.is_file(), f"{path.name} imports {name}, which is missing"
                url = "/" + target.relative_to(static).as_posix()
                assert c.get(url).status_code == 200, url


def test_the_studio_starts_from_the_servers_default_prompt() -> None:
    store = Path(__file__).parents[2] / "src" / "wanstream" / "server" / "static" / "js" / "store.js"
    assert f"export const DEFAULT_PROMPT = {json.dumps(DEFAULT_PROMPT)};" in store.read_text()
