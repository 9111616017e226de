/* kernelscope bench: what the C helpers share. Each helper is still built from its own .c
 * file; the bench puts this header into every helper's build key, so editing it rebuilds them.
 * Include it after `#define _GNU_SOURCE`.
 */
#ifndef KS_BENCH_COMMON_H
#define KS_BENCH_COMMON_H

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static inline long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Pin this process to `cpu` (nothing when cpu < 0); 0 on success, as sched_setaffinity. */
static inline int pin_cpu(int cpu)
{
	if (cpu < 0)
		return 0;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof(set), &set);
}

/* --- the libbpf reference consumers (ringbuf_consumer.c, perfbuf_consumer.c) ------------ */

#define SLOT 32

/* Each record is copied into a preallocated array of `cap` 32-byte slots (wrapping), as a
 * real consumer would copy it out of the buffer before the kernel reuses the space. */
struct state {
	unsigned char *slots;
	unsigned long long cap;
	unsigned long long received;
	unsigned long long bytes;
	unsigned long long lost; /* PERF_RECORD_LOST counts; always 0 for a ring buffer */
};

static inline void copy_sample(struct state *st, const void *data, size_t size)
{
	memcpy(st->slots + (st->received % st->cap) * SLOT, data, size < SLOT ? size : SLOT);
	st->received++;
	st->bytes += size;
}

static volatile sig_atomic_t stop __attribute__((unused));

static inline void on_usr1(int sig)
{
	(void)sig;
	stop = 1;
}

/* Pin, allocate and fault in the slots, and take SIGUSR1 (no SA_RESTART: poll returns EINTR). */
static inline int consumer_setup(struct state *st, int cpu)
{
	if (st->cap == 0)
		st->cap = 1;
	pin_cpu(cpu);
	st->slots = malloc(st->cap * SLOT);
	if (!st->slots) {
		fprintf(stderr, "cannot allocate %llu slots\n", st->cap);
		return 1;
	}
	memset(st->slots, 0, st->cap * SLOT); /* fault the pages in before timing */
	struct sigaction sa = {.sa_handler = on_usr1};
	sigaction(SIGUSR1, &sa, NULL);
	return 0;
}

/* The protocol on stdio: prints "ready" once the buffer is mapped.
 *   live:  polls until SIGUSR1, then consumes what is left.
 *   drain: waits for one byte on stdin, then times one consume().
 * Last line on stdout: a JSON object with counts and CLOCK_MONOTONIC times in ns.
 * `poll` and `consume` are libbpf's ring_buffer__* or perf_buffer__* for `buf`. */
static inline int consumer_run(struct state *st, void *buf, int drain, int (*poll)(void *, int),
				 int (*consume)(void *), const char *what)
{
	printf("ready\n");
	fflush(stdout);
	long long t_start, t_first = 0, t_last = 0, t_done;
	if (drain) {
		char go;
		if (read(0, &go, 1) != 1)
			return 3;
		t_start = now_ns();
		int n = consume(buf);
		t_done = now_ns();
		if (n < 0) {
			fprintf(stderr, "%s consume: %s\n", what, strerror(-n));
			return 1;
		}
		t_first = t_start;
		t_last = t_done;
	} else {
		t_start = now_ns();
		unsigned long long seen = 0;
		while (!stop) {
			int n = poll(buf, 10);
			if (n < 0 && n != -EINTR) {
				fprintf(stderr, "%s poll: %s\n", what, strerror(-n));
				return 1;
			}
			if (st->received + st->lost != seen) {
				seen = st->received + st->lost;
				t_last = now_ns();
				if (!t_first)
					t_first = t_last;
			}
		}
		consume(buf);
		if (st->received + st->lost != seen)
			t_last = now_ns();
		t_done = now_ns();
	}
	printf("{\"received\": %llu, \"lost\": %llu, \"bytes\": %llu, \"t_start\": %lld, "
	       "\"t_first\": %lld, \"t_last\": %lld, \"t_done\": %lld}\n",
	       st->received, st->lost, st->bytes, t_start, t_first, t_last, t_done);
	return 0;
}

#endif
