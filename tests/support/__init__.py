"""Test-only builders shared by tests/ and tests/bench/: tiny models, sample images, reference formulas.

Nothing here ships to users' code paths; production modules never import it.
"""
