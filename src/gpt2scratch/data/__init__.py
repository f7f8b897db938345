"""Training data: documents read, the built-in corpus, the token cache, token shards and their loaders, prepare."""
