"""Backends: compile, load and attach a program (BCC, or CO-RE through libbpf)."""
