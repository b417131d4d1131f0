"""Pipeline stages 0-2 (pretrain, SFT, RM) as Ray Train jobs; shared harness in `harness`."""
