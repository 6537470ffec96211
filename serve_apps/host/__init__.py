"""Tuning for the machine the engines run on: which CPUs compute and which serve."""
