"""ml_collections config files: one per environment; the config argument picks the model preset."""
