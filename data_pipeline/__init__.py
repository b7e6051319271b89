"""Text to token shards to training batches: tokenizer, builder, loader (see README, 'Data pipeline')."""
