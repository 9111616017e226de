/* kernelscope bench: libbpf reference producer for a BPF user ring buffer map.
 *
 * usage: userring_producer MAP_FD SAMPLES
 * MAP_FD is a BPF_MAP_TYPE_USER_RINGBUF map fd inherited from the parent. Writes SAMPLES
 * 32-byte samples {u64 seq = i; u64 pad[3]} with user_ring_buffer__reserve / __submit, one
 * at a time, as libbpf's API does. Nothing drains meanwhile: the ring must hold them all.
 * Last line on stdout: a JSON object with the count and the CLOCK_MONOTONIC time in ns.
 */
#define _GNU_SOURCE
#include <bpf/libbpf.h>

#include "bench_common.h"

struct sample {
	unsigned long long seq, pad[3];
};

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s MAP_FD SAMPLES\n", argv[0]);
		return 2;
	}
	int fd = atoi(argv[1]);
	unsigned long long n = strtoull(argv[2], NULL, 10), i;
	struct user_ring_buffer *rb = user_ring_buffer__new(fd, NULL);
	if (!rb) {
		fprintf(stderr, "user_ring_buffer__new: %s\n", strerror(errno));
		return 1;
	}
	long long t0 = now_ns();
	for (i = 0; i < n; i++) {
		struct sample *s = user_ring_buffer__reserve(rb, sizeof(*s));
		if (!s) {
			fprintf(stderr, "reserve failed at %llu: %s\n", i, strerror(errno));
			break;
		}
		memset(s, 0, sizeof(*s));
		s->seq = i;
		user_ring_buffer__submit(rb, s);
	}
	long long t1 = now_ns();
	user_ring_buffer__free(rb);
	printf("{\"sent\": %llu, \"ns\": %lld}\n", i, t1 - t0);
	return i == n ? 0 : 1;
}
