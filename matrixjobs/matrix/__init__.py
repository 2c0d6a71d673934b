"""The Matrix interface: run jobs from room commands, one live progress message each."""
