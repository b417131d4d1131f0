"""Pipeline stages 0-2 (pretrain, SFT, RM) as Ray Train jobs.

Shared: `harness` runs a stage and orders its data, `training` steps it, `checkpointing` saves and exports it.
"""
