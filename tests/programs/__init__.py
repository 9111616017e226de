"""BPF programs the kernel tests load (written here in libbpf-tools / BCC style)."""

# floor(log2(v)), 0 for 0 and 1: the rule of libbpf-tools' log2l (bits.bpf.h), written here
# for the CO-RE test programs that bucket values as the tools do (kernelscope.hist's
# "libbpf-tools" rule); paste it into a program with .replace("LOG2L", LOG2L).
LOG2L = r"""
static __always_inline u64 log2l(u64 v)  /* floor(log2(v)), 0 for 0 and 1 */
{
    u64 r = 0;
    for (int i = 32; i > 0; i >>= 1)
        if (v >> i) { v >>= i; r += i; }
    return r;
}
"""
