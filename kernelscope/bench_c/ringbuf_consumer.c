/* kernelscope bench: libbpf reference consumer for a BPF ring buffer map.
 *
 * usage: ringbuf_consumer MAP_FD live|drain CAPACITY [CPU]
 * MAP_FD is a ring buffer map fd inherited from the parent (BCC created the map).
 * Each record is copied into a preallocated array of CAPACITY 32-byte slots (wrapping),
 * as a real consumer would copy it out of the ring before the kernel reuses the space.
 *
 * Protocol on stdio: prints "ready" once the ring is mapped.
 *   live:  polls until SIGUSR1, then drains what is left and exits.
 *   drain: waits for one byte on stdin, then times one ring_buffer__consume().
 * Last line on stdout: a JSON object with counts and CLOCK_MONOTONIC times in ns.
 */
#define _GNU_SOURCE
#include <bpf/libbpf.h>
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SLOT 32

struct state {
	unsigned char *slots;
	unsigned long long cap;
	unsigned long long received;
	unsigned long long bytes;
};

static volatile sig_atomic_t stop;

static void on_usr1(int sig)
{
	(void)sig;
	stop = 1;
}

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int on_sample(void *ctx, void *data, size_t size)
{
	struct state *st = ctx;
	memcpy(st->slots + (st->received % st->cap) * SLOT, data, size < SLOT ? size : SLOT);
	st->received++;
	st->bytes += size;
	return 0;
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
	int cpu = argc > 4 ? atoi(argv[4]) : -1;
	if (st.cap == 0)
		st.cap = 1;

	if (cpu >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		sched_setaffinity(0, sizeof(set), &set);
	}
	st.slots = malloc(st.cap * SLOT);
	if (!st.slots) {
		fprintf(stderr, "cannot allocate %llu slots\n", st.cap);
		return 1;
	}
	memset(st.slots, 0, st.cap * SLOT); /* fault the pages in before timing */

	struct sigaction sa = {.sa_handler = on_usr1}; /* no SA_RESTART: epoll_wait returns EINTR */
	sigaction(SIGUSR1, &sa, NULL);

	struct ring_buffer *rb = ring_buffer__new(map_fd, on_sample, &st, NULL);
	if (!rb) {
		fprintf(stderr, "ring_buffer__new(fd %d): %s\n", map_fd, strerror(errno));
		return 1;
	}
	printf("ready\n");
	fflush(stdout);

	long long t_start, t_first = 0, t_last = 0, t_done;
	if (drain) {
		char go;
		if (read(0, &go, 1) != 1)
			return 3;
		t_start = now_ns();
		int n = ring_buffer__consume(rb);
		t_done = now_ns();
		if (n < 0) {
			fprintf(stderr, "ring_buffer__consume: %s\n", strerror(-n));
			return 1;
		}
		t_first = t_start;
		t_last = t_done;
	} else {
		t_start = now_ns();
		while (!stop) {
			int n = ring_buffer__poll(rb, 10);
			if (n > 0) {
				t_last = now_ns();
				if (!t_first)
					t_first = t_last;
			} else if (n < 0 && n != -EINTR) {
				fprintf(stderr, "ring_buffer__poll: %s\n", strerror(-n));
				return 1;
			}
		}
		if (ring_buffer__consume(rb) > 0)
			t_last = now_ns();
		t_done = now_ns();
	}
	printf("{\"received\": %llu, \"lost\": 0, \"bytes\": %llu, \"t_start\": %lld, "
	       "\"t_first\": %lld, \"t_last\": %lld, \"t_done\": %lld}\n",
	       st.received, st.bytes, t_start, t_first, t_last, t_done);
	ring_buffer__free(rb);
	free(st.slots);
	return 0;
}
