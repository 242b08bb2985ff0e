"""Evaluation tasks the runner scores models with: RULER-style synthetic tasks (`ruler`)."""
