"""mossnode: the coordination daemon that lets OpenClaw agents on many hosts work as one swarm."""

__version__ = "0.1.0"
