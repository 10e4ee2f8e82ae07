"""Watching bulk runs: per-image uncertainty and image statistics, the reference profile a trained
artifact carries, each run's monitoring summary and drift test, and its review queue."""
