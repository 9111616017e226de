/* kernelscope bench: libbpf reference consumer for a BPF perf event array.
 *
 * usage: perfbuf_consumer MAP_FD live|drain CAPACITY PAGES [CPU]
 * MAP_FD is a BPF_MAP_TYPE_PERF_EVENT_ARRAY fd inherited from the parent (BCC created the
 * map, nobody opened perf buffers on it). perf_buffer__new() opens one perf event per CPU
 * with PAGES data pages each, wakeup on every sample (libbpf's default, as BCC's), and
 * stores the perf fds in the map. Samples go into CAPACITY 32-byte slots; PERF_RECORD_LOST
 * counts are summed. The stdio protocol is consumer_run's (bench_common.h).
 */
#define _GNU_SOURCE
#include <bpf/libbpf.h>

#include "bench_common.h"

static void on_sample(void *ctx, int cpu, void *data, __u32 size)
{
	(void)cpu;
	copy_sample(ctx, data, size);
}

static void on_lost(void *ctx, int cpu, __u64 cnt)
{
	struct state *st = ctx;
	(void)cpu;
	st->lost += cnt;
}

static int poll_pb(void *pb, int ms)
{
	return perf_buffer__poll(pb, ms);
}

static int consume_pb(void *pb)
{
	return perf_buffer__consume(pb);
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: %s MAP_FD live|drain CAPACITY PAGES [CPU]\n", argv[0]);
		return 2;
	}
	int map_fd = atoi(argv[1]);
	int drain = strcmp(argv[2], "drain") == 0;
	struct state st = {.cap = strtoull(argv[3], NULL, 10)};
	size_t pages = strtoull(argv[4], NULL, 10);
	if (consumer_setup(&st, argc > 5 ? atoi(argv[5]) : -1))
		return 1;
	struct perf_buffer *pb = perf_buffer__new(map_fd, pages, on_sample, on_lost, &st, NULL);
	if (!pb) {
		fprintf(stderr, "perf_buffer__new(fd %d, %zu pages): %s\n", map_fd, pages,
			strerror(errno));
		return 1;
	}
	int rc = consumer_run(&st, pb, drain, poll_pb, consume_pb, "perf_buffer");
	perf_buffer__free(pb);
	free(st.slots);
	return rc;
}
