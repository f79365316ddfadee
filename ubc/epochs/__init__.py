"""Allocation epochs and the utilization report."""
