"""Test fixtures: tiny random checkpoints and synthetic video datasets."""
