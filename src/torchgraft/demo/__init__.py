"""The seed's scenarios on real checkpoints, and the small things they need (no downloads)."""
