"""agentvm-supervise benchmarks against its peers: run `.venv/bin/python -m bench` (README, "Bench")."""
