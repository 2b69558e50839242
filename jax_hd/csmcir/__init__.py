"""CSMCIR: symmetric dual-tower composed image retrieval (model, bank, losses, captions, training, evaluation)."""
