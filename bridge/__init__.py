"""agent-bridge: run coding agents from team chat."""

__version__ = "0.1.0"
