/* kernelscope bench producer: calls getppid() in a tight loop so a tracepoint program
 * on syscalls:sys_enter_getppid emits events at full speed.
 *
 * usage: producer COUNT [SECONDS] [CPU] [RATE]
 *   COUNT > 0: exactly COUNT calls; COUNT == 0: as many calls as fit in SECONDS.
 *   CPU >= 0 pins the process to that CPU.
 *   RATE > 0 (with COUNT > 0) paces the calls: call i is made once CLOCK_MONOTONIC reaches
 *   t_start + i / RATE, spinning in between (no sleep: a sleep's wake-up is 50+ us late),
 *   so the events arrive evenly at RATE per second, or as fast as the calls go if slower.
 * The producer waits for one byte on stdin before it starts (so the caller can load a
 * program filtered on its pid first) and exits without calling anything on EOF. When
 * done it prints "calls t_start_ns t_end_ns" (CLOCK_MONOTONIC) on stdout.
 */
#define _GNU_SOURCE
#include <sys/syscall.h>

#include "bench_common.h"

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s COUNT [SECONDS] [CPU] [RATE]\n", argv[0]);
		return 2;
	}
	long long count = atoll(argv[1]);
	double seconds = argc > 2 ? atof(argv[2]) : 0.0;
	int cpu = argc > 3 ? atoi(argv[3]) : -1;
	double rate = argc > 4 ? atof(argv[4]) : 0.0;

	if (pin_cpu(cpu) != 0) {
		perror("sched_setaffinity");
		return 1;
	}

	char go;
	if (read(0, &go, 1) != 1)
		return 3; /* caller gave up before starting us */

	long long calls = 0;
	long long t0 = now_ns(), t1;
	if (count > 0 && rate > 0) {
		double gap_ns = 1e9 / rate;
		for (; calls < count; calls++) {
			long long due = t0 + (long long)(calls * gap_ns);
			while (now_ns() < due)
				;
			syscall(SYS_getppid);
		}
		t1 = now_ns();
	} else if (count > 0) {
		for (; calls < count; calls++)
			syscall(SYS_getppid); /* the raw syscall: no libc caching, one tracepoint hit */
		t1 = now_ns();
	} else {
		long long end = t0 + (long long)(seconds * 1e9);
		for (;;) {
			for (int i = 0; i < 1024; i++)
				syscall(SYS_getppid);
			calls += 1024;
			t1 = now_ns();
			if (t1 >= end)
				break;
		}
	}
	printf("%lld %lld %lld\n", calls, t0, t1);
	return 0;
}
