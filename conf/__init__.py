"""Hydra configs (the YAML files, one folder per group) and how an option is declared and checked (schema.py)."""
