"""Plan -> a training run on torch.distributed: groups bound to NICs, pipeline, DP sync, checkpoints."""
