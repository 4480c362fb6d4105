"""Live-rig I/O: server-side sources (NDI) and sinks (MPEG-TS over HTTP, NDI, virtual camera, Spout,
Syphon), chosen per session, and what this machine can do (`hardware`)."""
