//! Test fixtures: upstream model servers and helpers that start the real binaries.
