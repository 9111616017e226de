/* kernelscope: libbpf's bpf_tracing.h, and what later libbpf releases added that current
 * libbpf-tools sources use, each defined only where the installed header lacks it. */
#ifndef __KERNELSCOPE_BPF_TRACING_H
#define __KERNELSCOPE_BPF_TRACING_H

#include_next <bpf/bpf_tracing.h>

/* uprobes read their arguments from pt_regs exactly as kprobes do */
#ifndef BPF_UPROBE
#define BPF_UPROBE(name, args...) BPF_KPROBE(name, ##args)
#endif

#ifndef BPF_URETPROBE
#define BPF_URETPROBE(name, args...) BPF_KRETPROBE(name, ##args)
#endif

#endif /* __KERNELSCOPE_BPF_TRACING_H */
