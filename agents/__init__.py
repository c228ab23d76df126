"""fairgpu: agents package."""
