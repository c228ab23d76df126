"""fairgpu: migrations package."""
