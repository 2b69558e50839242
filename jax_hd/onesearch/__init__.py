"""OneSearch: semantic IDs, generative retrieval model, self-distillation, preference alignment."""
