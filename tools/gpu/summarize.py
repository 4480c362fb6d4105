"""Gather a GPU call's runs into the two files the device hands back (it returns at most 8 files).

`python3 tools/gpu/summarize.py WORK OUT PART` reads WORK/NAME.rc ("exit-code [seconds]"), NAME.log and
NAME.json for every run, plus WORK/steps.txt when present, and writes OUT/summary_PART.json (exit codes, crash
lines, every JSON the runs wrote) and OUT/log_PART.txt (the tail of every log). A JSON without a run of its name
lands at the summary's top level; WORK/estimates.json is also copied as is. Safe to call after every run.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

CRASH = re.compile(r"Error|Traceback|CUDA error|capture")
LOG_TAIL = 60_000  # characters of each log


def _load(path: Path, into: dict[str, Any], key: str) -> None:
    """into[key] = the file's JSON, or into[key + "_error"] = why it would not parse (a run cut short)."""
    try:
        into[key] = json.loads(path.read_text())
    except ValueError as exc:
        into[f"{key}_error"] = str(exc)


def summarize(work: Path, out: Path, part: str) -> dict[str, Any]:
    summary: dict[str, Any] = {"part": part, "runs": {}}
    if (work / "steps.txt").exists():
        summary["steps"] = (work / "steps.txt").read_text().splitlines()
    for rc_file in sorted(work.glob("*.rc")):
        name = rc_file.stem
        fields = rc_file.read_text().split()
        entry: dict[str, Any] = {"rc": int(fields[0])}
        if len(fields) > 1:
            entry["seconds"] = float(fields[1])
        if (log := work / f"{name}.log").exists():
            lines = log.read_text(errors="replace").splitlines()
            entry["crash_lines"] = [line for line in lines if CRASH.search(line)][:12]
        if (result := work / f"{name}.json").exists():
            _load(result, entry, "json")
        summary["runs"][name] = entry
    for extra in sorted(work.glob("*.json")):
        if extra.stem not in summary["runs"]:
            _load(extra, summary, extra.stem)
    (out / f"summary_{part}.json").write_text(json.dumps(summary, indent=1))
    logs = (
        f"\n===== {log.name} =====\n" + log.read_text(errors="replace")[-LOG_TAIL:]
        for log in sorted(work.glob("*.log"))
    )
    (out / f"log_{part}.txt").write_text("".join(logs))
    if (work / "estimates.json").exists():
        shutil.copy(work / "estimates.json", out / "estimates.json")
    return summary


if __name__ == "__main__":
    result = summarize(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
    print("  runs so far:", {k: v["rc"] for k, v in result["runs"].items()})
