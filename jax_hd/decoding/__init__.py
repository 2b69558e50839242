"""Decoding: KV-cache sampling, beam search, prefix-tree constraints."""
