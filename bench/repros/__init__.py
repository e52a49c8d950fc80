"""Minimal reproductions of problems the benchmarks found in code under test."""
