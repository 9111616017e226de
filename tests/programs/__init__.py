"""BPF programs the kernel tests load (written here in libbpf-tools / BCC style)."""
