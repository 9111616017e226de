/* kernelscope bench: libbpf reference consumer for a BPF perf event array.
 *
 * usage: perfbuf_consumer MAP_FD live|drain CAPACITY PAGES [CPU]
 * MAP_FD is a BPF_MAP_TYPE_PERF_EVENT_ARRAY fd inherited from the parent (BCC created the
 * map, nobody opened perf buffers on it). perf_buffer__new() opens one perf event per CPU
 * with PAGES data pages each, wakeup on every sample (libbpf's default, as BCC's), and
 * stores the perf fds in the map. Each sample is copied into a preallocated array of
 * CAPACITY 32-byte slots (wrapping); PERF_RECORD_LOST counts are summed.
 *
 * Protocol as ringbuf_consumer: "ready", then live (until SIGUSR1) or drain (one byte on
 * stdin, then one timed perf_buffer__consume()); last stdout line is a JSON object.
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
	unsigned long long lost;
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

static void on_sample(void *ctx, int cpu, void *data, __u32 size)
{
	struct state *st = ctx;
	(void)cpu;
	memcpy(st->slots + (st->received % st->cap) * SLOT, data, size < SLOT ? size : SLOT);
	st->received++;
	st->bytes += size;
}

static void on_lost(void *ctx, int cpu, __u64 cnt)
{
	struct state *st = ctx;
	(void)cpu;
	st->lost += cnt;
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
	int cpu = argc > 5 ? atoi(argv[5]) : -1;
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
	memset(st.slots, 0, st.cap * SLOT);

	struct sigaction sa = {.sa_handler = on_usr1};
	sigaction(SIGUSR1, &sa, NULL);

	struct perf_buffer *pb = perf_buffer__new(map_fd, pages, on_sample, on_lost, &st, NULL);
	if (!pb) {
		fprintf(stderr, "perf_buffer__new(fd %d, %zu pages): %s\n", map_fd, pages,
			strerror(errno));
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
		int err = perf_buffer__consume(pb);
		t_done = now_ns();
		if (err < 0) {
			fprintf(stderr, "perf_buffer__consume: %s\n", strerror(-err));
			return 1;
		}
		t_first = t_start;
		t_last = t_done;
	} else {
		t_start = now_ns();
		unsigned long long seen = 0;
		while (!stop) {
			int n = perf_buffer__poll(pb, 10);
			if (n < 0 && n != -EINTR) {
				fprintf(stderr, "perf_buffer__poll: %s\n", strerror(-n));
				return 1;
			}
			if (st.received + st.lost != seen) {
				seen = st.received + st.lost;
				t_last = now_ns();
				if (!t_first)
					t_first = t_last;
			}
		}
		perf_buffer__consume(pb);
		if (st.received + st.lost != seen)
			t_last = now_ns();
		t_done = now_ns();
	}
	printf("{\"received\": %llu, \"lost\": %llu, \"bytes\": %llu, \"t_start\": %lld, "
	       "\"t_first\": %lld, \"t_last\": %lld, \"t_done\": %lld}\n",
	       st.received, st.lost, st.bytes, t_start, t_first, t_last, t_done);
	perf_buffer__free(pb);
	free(st.slots);
	return 0;
}
