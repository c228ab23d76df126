"""Benchmarks of the running server (`fairgpu bench api`)."""
