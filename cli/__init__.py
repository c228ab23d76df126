"""fairgpu: cli package."""
