"""fairgpu: scheduler package."""
