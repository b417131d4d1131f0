"""Stage 3: the single-controller PPO-ptx loop over Ray actor roles (docs/architecture.md)."""
