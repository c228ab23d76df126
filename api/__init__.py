"""fairgpu: api package."""
