"""Checkpoints: the file format and its writer, O_DIRECT, sharded snapshots, the transformers format, one loader."""
