"""Benchmarks: router placement speed (placement_speed) and a cluster-scale simulator (sim)."""
