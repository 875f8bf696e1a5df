"""Recurrence kernels: pure-PyTorch parallel scans, tiny reference loops, optional GPU kernel dispatch."""
