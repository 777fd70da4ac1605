"""The simulation harness: a whole fleet on one machine with real processes."""
