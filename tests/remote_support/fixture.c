/* Fixture program for tests/remote.rs: calls known functions a known
 * number of times and writes a checksum to the file named by its first
 * argument.
 *
 *   fixture OUT work N THREADS   rt_work N times in each of THREADS threads
 *   fixture OUT libc N           getppid N times
 *   fixture OUT fork N           rt_work N times, then a child that calls it
 *                                N times and exits 7; the parent waits
 *   fixture OUT forkin N         rt_work N times, then rt_fork, which forks
 *                                inside: both return from it; the child
 *                                calls rt_work N times and exits 7
 *   fixture OUT until STOPFILE   rt_work in a loop until STOPFILE exists
 *   fixture OUT slow STOPFILE    rt_slow (which sleeps 2 ms inside) in a
 *                                loop until STOPFILE exists
 *   fixture OUT dlopen LIB N     twice: dlopen LIB, call its lib_add N
 *                                times, dlclose
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <ucontext.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* The counter keeps the compiler from dropping calls whose result is
 * unused (a pure function's). */
static volatile long calls;

__attribute__((noinline)) long rt_work(long x) {
    calls++;
    return x * 3 + 1;
}

__attribute__((noinline)) long rt_other(long x) {
    calls++;
    return x - 1;
}

/* Forks inside: a call in flight in both processes. */
__attribute__((noinline)) long rt_fork(void) {
    calls++;
    return (long)fork();
}

/* Sleeps inside: a call in flight most of the time. */
__attribute__((noinline)) long rt_slow(long x) {
    calls++;
    usleep(2000);
    return x + 2;
}

static long loops;

/* A crash says where: the signal, the faulting address, the instruction
 * pointer and the word at the stack pointer, and the mappings, on standard
 * error; then the default action (the exit status is the signal's). */
static void crashed(int sig, siginfo_t *si, void *ctx) {
    ucontext_t *uc = ctx;
    char buf[256];
    unsigned long sp = (unsigned long)uc->uc_mcontext.gregs[REG_RSP];
    int n = snprintf(buf, sizeof buf,
                     "fixture: signal %d at %p, rip %#llx, rsp %#lx -> %#lx\n", sig,
                     si->si_addr, (unsigned long long)uc->uc_mcontext.gregs[REG_RIP], sp,
                     *(unsigned long *)sp);
    write(2, buf, n);
    int fd = open("/proc/self/maps", O_RDONLY);
    while (fd >= 0 && (n = read(fd, buf, sizeof buf)) > 0) write(2, buf, n);
    signal(sig, SIG_DFL);
    raise(sig);
}

/* rt_work every iteration, rt_other every 64th. */
static void *run(void *arg) {
    (void)arg;
    long s = 0;
    for (long i = 0; i < loops; i++) {
        s += rt_work(i);
        if ((i & 63) == 0) s += rt_other(i);
    }
    return (void *)s;
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    struct sigaction sa = {0};
    sa.sa_sigaction = crashed;
    sa.sa_flags = SA_SIGINFO | SA_RESETHAND;
    sigaction(SIGSEGV, &sa, 0);
    sigaction(SIGBUS, &sa, 0);
    sigaction(SIGILL, &sa, 0);
    FILE *out = fopen(argv[1], "w");
    if (!out) return 3;
    const char *mode = argv[2];
    long sum = 0;
    if (!strcmp(mode, "work")) {
        loops = atol(argv[3]);
        int threads = argc > 4 ? atoi(argv[4]) : 1;
        pthread_t t[16];
        for (int i = 0; i < threads && i < 16; i++) pthread_create(&t[i], 0, run, 0);
        for (int i = 0; i < threads && i < 16; i++) {
            void *r;
            pthread_join(t[i], &r);
            sum += (long)r;
        }
    } else if (!strcmp(mode, "libc")) {
        long n = atol(argv[3]);
        for (long i = 0; i < n; i++) sum += getppid() > 0;
    } else if (!strcmp(mode, "fork")) {
        loops = atol(argv[3]);
        sum += (long)run(0);
        pid_t c = fork();
        if (c == 0) {
            run(0);
            _exit(7);
        }
        int st = 0;
        waitpid(c, &st, 0);
        sum += WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    } else if (!strcmp(mode, "forkin")) {
        loops = atol(argv[3]);
        sum += (long)run(0);
        long c = rt_fork();
        if (c == 0) {
            run(0);
            _exit(7);
        }
        int st = 0;
        waitpid((pid_t)c, &st, 0);
        sum += WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    } else if (!strcmp(mode, "slow")) {
        long i = 0;
        while (access(argv[3], F_OK) != 0) {
            sum += rt_slow(i) == i + 2;
            i++;
        }
        sum = sum == i;
    } else if (!strcmp(mode, "dlopen")) {
        long n = argc > 4 ? atol(argv[4]) : 0;
        for (int round = 0; round < 2; round++) {
            void *h = dlopen(argv[3], RTLD_NOW);
            if (!h) return 4;
            long (*add)(long) = (long (*)(long))dlsym(h, "lib_add");
            if (!add) return 5;
            for (long i = 0; i < n; i++) sum += add(i);
            dlclose(h);
        }
    } else if (!strcmp(mode, "until")) {
        long i = 0;
        while (access(argv[3], F_OK) != 0) {
            sum += rt_work(i++ & 1023);
            if ((i & 1023) == 0) usleep(100);
        }
        sum = i > 0;
    }
    fprintf(out, "checksum %ld\n", sum);
    fclose(out);
    return 0;
}
