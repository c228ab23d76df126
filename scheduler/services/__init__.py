"""fairgpu: scheduler.services package."""
