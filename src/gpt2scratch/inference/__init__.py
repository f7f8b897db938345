"""Inference: the decoding engine with its KV cache, sampling, text in and out, and models made ready for it."""
