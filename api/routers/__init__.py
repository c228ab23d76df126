"""fairgpu: api.routers package."""
