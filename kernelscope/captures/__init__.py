"""Captures: probe events saved to one file, and replayed without BPF."""
