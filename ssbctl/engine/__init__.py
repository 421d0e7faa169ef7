"""Training loop, checkpoint I/O and run loading."""
