"""GreenPost refinement nodes (filled in by the keying work)."""
NODES: list = []
