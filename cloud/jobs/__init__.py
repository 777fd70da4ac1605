"""Long-running jobs of the controller (compression now, federation later), each in a worker
process of its own, with state in the registry so that they survive a controller restart."""
