"""Benchmarks of the engine's graph runtime (never imported by the gate's cases). See bench/README.md."""
