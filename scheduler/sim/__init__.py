"""fairgpu: scheduler.sim package."""
