"""Training loop, optimisation, engines (plain torch, DDP, DeepSpeed) and checkpoints."""
