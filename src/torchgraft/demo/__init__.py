"""The demo scenarios on real checkpoints, and where those checkpoints are installed (no downloads)."""
