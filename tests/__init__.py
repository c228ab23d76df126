"""fairgpu: tests package."""
