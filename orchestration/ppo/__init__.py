"""Stage 3: the single-controller PPO-ptx loop (DESIGN §3)."""
