// How many bytes each read(2) returned, as a log2 histogram kept in a map: the kernel adds
// one to the bucket of each read, user space reads ~30 counters instead of every event.
// Read: read_sizes.maps["read_bytes"].hist(unit="bytes"), a table of buckets with
// percentiles; .plot() draws it. One process only: add -D TARGET=PID to the %%bpf line.
BPF_HISTOGRAM(read_bytes);

TRACEPOINT_PROBE(syscalls, sys_exit_read) {
#ifdef TARGET
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET)
        return 0;
#endif
    if (args->ret <= 0)
        return 0; // an error or the end of the file: no bytes
    read_bytes.increment(bpf_log2l(args->ret));
    return 0;
}
