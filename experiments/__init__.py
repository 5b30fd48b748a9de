"""Entry points (``python -m experiments.<name>``) and their ml_collections configs."""
