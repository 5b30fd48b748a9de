"""Worker scripts of ``experiments/bench_peers.py`` (each runs in its own interpreter / venv)."""
