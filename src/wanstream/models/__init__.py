"""Pure torch modules in the official checkpoint layouts: no I/O, no per-stream state."""
