/* kernelscope bench: libbpf reference consumer for a BPF ring buffer map.
 *
 * usage: ringbuf_consumer MAP_FD live|drain CAPACITY [CPU]
 * MAP_FD is a ring buffer map fd inherited from the parent (BCC created the map).
 * Records go into CAPACITY 32-byte slots; the stdio protocol is consumer_run's
 * (bench_common.h): "ready", then live (until SIGUSR1) or drain (one byte on stdin, then
 * one timed ring_buffer__consume()); the last stdout line is a JSON object.
 */
#define _GNU_SOURCE
#include <bpf/libbpf.h>

#include "bench_common.h"

static int on_sample(void *ctx, void *data, size_t size)
{
	copy_sample(ctx, data, size);
	return 0;
}

static int poll_rb(void *rb, int ms)
{
	return ring_buffer__poll(rb, ms);
}

static int consume_rb(void *rb)
{
	return ring_buffer__consume(rb);
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s MAP_FD live|drain CAPACITY [CPU]\n", argv[0]);
		return 2;
	}
	int map_fd = atoi(argv[1]);
	int drain = strcmp(argv[2], "drain") == 0;
	struct state st = {.cap = strtoull(argv[3], NULL, 10)};
	if (consumer_setup(&st, argc > 4 ? atoi(argv[4]) : -1))
		return 1;
	struct ring_buffer *rb = ring_buffer__new(map_fd, on_sample, &st, NULL);
	if (!rb) {
		fprintf(stderr, "ring_buffer__new(fd %d): %s\n", map_fd, strerror(errno));
		return 1;
	}
	int rc = consumer_run(&st, rb, drain, poll_rb, consume_rb, "ring_buffer");
	ring_buffer__free(rb);
	free(st.slots);
	return rc;
}
