"""Serving: the OpenAI-compatible HTTP app, its server, the batcher, the request schema and Prometheus metrics."""
