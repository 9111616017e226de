"""`kernelscope doctor`: what this host can do with eBPF, and how to fix what it cannot."""
