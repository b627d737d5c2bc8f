"""Transparent export and alpha-convention nodes."""
NODES: list = []
