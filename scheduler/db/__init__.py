"""fairgpu: scheduler.db package."""
