"""Workloads shipped with fastvec."""
