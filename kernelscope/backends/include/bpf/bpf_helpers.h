/* kernelscope: libbpf's bpf_helpers.h, and what later libbpf releases added that current
 * libbpf-tools sources use. The installed header comes first; each addition is defined only
 * where that header lacks it, so a newer libbpf wins. */
#ifndef __KERNELSCOPE_BPF_HELPERS_H
#define __KERNELSCOPE_BPF_HELPERS_H

#include_next <bpf/bpf_helpers.h>

#ifndef __weak
#define __weak __attribute__((weak))
#endif

#ifndef __ksym
#define __ksym __attribute__((section(".ksyms")))
#endif

/* True when the kernel has the weak extern symbol `sym` (a kfunc or a ksym): libbpf leaves
 * a missing one at address 0. A constant operand means `sym` was not declared weak. */
#ifndef bpf_ksym_exists
#define bpf_ksym_exists(sym) ({                                                         \
	_Static_assert(!__builtin_constant_p(!!(sym)), #sym " must be declared __weak"); \
	!!(sym);                                                                        \
})
#endif

#endif /* __KERNELSCOPE_BPF_HELPERS_H */
