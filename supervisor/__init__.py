"""agentvm-supervise: run an AI coding agent in a throw-away microVM."""

__version__ = "0.1.0"
