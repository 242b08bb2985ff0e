"""Ranks and process groups: starting local workers or joining torchrun's group (`launch`)."""
