"""`kernelscope bench`: kernelscope's readers against BCC and libbpf consumers, in one run."""
