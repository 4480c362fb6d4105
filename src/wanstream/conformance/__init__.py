"""Replays golden vectors recorded from the reference implementations against wanstream."""

from wanstream.conformance.case import CaseError, CaseReport, GoldenCase, rel_l2
from wanstream.conformance.runner import CaseOutcome, RunOptions, discover, run_case, run_directory

__all__ = [
    "CaseError",
    "CaseOutcome",
    "CaseReport",
    "GoldenCase",
    "RunOptions",
    "discover",
    "rel_l2",
    "run_case",
    "run_directory",
]
