"""Experiments: typed config, resumable pipeline stages, CLI."""
