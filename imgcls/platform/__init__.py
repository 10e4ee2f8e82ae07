"""Shared plumbing: storage URIs and bounded reads, Parquet runs and their lease, Ray start-up, CPU plans, logging, TensorFlow import."""
