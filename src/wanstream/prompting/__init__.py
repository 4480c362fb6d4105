"""Prompt extension: a short prompt → the long, detailed paragraph the model works best with (docs/prompts.md)."""
