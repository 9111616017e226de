// A process with a known hot function and a known sleeping one, for stacks and flame graphs
// (kernelscope.lab.Workload, notebook 07, tests/test_stacks_kernel.py, tests/test_symbols.py).
// Built with cc -O0 -fno-omit-frame-pointer -g (PIE or not).
//
//   stdout: "burn=0x.. nap=0x.. main=0x.. pid=N"  (its own functions' addresses)
//   stdin "go\n": a thread named "burner" spins in burn() while the main thread calls nap()
//   NAPS times, each a nanosleep of NAP_MS; then "burner=TID slept_ns=N burner_cpu_ns=N" (the sleep it measured, the
//   burner thread's CPU time)
//   stdin closed: exit.
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile int stop;
static volatile uint64_t sink;
static volatile pid_t burner_tid;
static int64_t burner_cpu_ns;

// inlined into burn even at -O0: the DWARF of burn has a DW_TAG_inlined_subroutine for it
static inline __attribute__((always_inline)) uint64_t mix(uint64_t x)
{
	for (int i = 0; i < 64; i++)
		x = x * 6364136223846793005ULL + 1442695040888963407ULL;
	return x;
}

__attribute__((noinline)) void burn(void)
{
	uint64_t x = 0;
	while (!stop)
		x = mix(x);
	sink = x;
}

static void *burner(void *arg)
{
	(void)arg;
	burner_tid = (pid_t)syscall(SYS_gettid);
	pthread_setname_np(pthread_self(), "burner");
	burn();
	struct timespec cpu;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu);
	burner_cpu_ns = cpu.tv_sec * 1000000000LL + cpu.tv_nsec;
	return NULL;
}

// nanosleep by the syscall instruction itself: the user stack the kernel records then starts
// in nap(). Through libc's wrapper (built without frame pointers) the frame-pointer walk would
// skip from the wrapper to nap's caller and lose nap.
__attribute__((noinline)) int64_t nap(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L}, t0, t1;
	long ret;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	__asm__ volatile("syscall" : "=a"(ret) : "a"(SYS_nanosleep), "D"(&ts), "S"(0)
			 : "rcx", "r11", "memory");
	clock_gettime(CLOCK_MONOTONIC, &t1);
	(void)ret;
	return (t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
}

int main(int argc, char **argv)
{
	int naps = argc > 1 ? atoi(argv[1]) : 10;
	long nap_ms = argc > 2 ? atol(argv[2]) : 100;
	char line[16];
	pthread_t t;
	int64_t slept = 0;

	printf("burn=%p nap=%p main=%p pid=%d\n", (void *)burn, (void *)nap, (void *)main, getpid());
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 0;
	pthread_create(&t, NULL, burner, NULL);
	for (int i = 0; i < naps; i++)
		slept += nap(nap_ms);
	stop = 1;
	pthread_join(t, NULL);
	printf("burner=%d slept_ns=%lld burner_cpu_ns=%lld\n", burner_tid, (long long)slept,
	       (long long)burner_cpu_ns);
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin))
		;
	return 0;
}
