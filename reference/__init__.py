"""The test oracle: DGL's forward pass written the way the published code computes it (``reference.published``).

It imports nothing of the project, so that the tests that hold ``modules.dgl`` against it compare two
independent writings of the same computation; the benchmarks time it as the baseline.
"""
