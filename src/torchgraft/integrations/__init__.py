"""What torchgraft knows about model families (duck-typed: nothing here imports them)."""
