"""Several processes as one run: the world torchrun describes, DDP or FSDP2 applied, full and sharded state dicts."""
