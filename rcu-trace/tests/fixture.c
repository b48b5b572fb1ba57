/* The program rcu-trace's tests trace: known call counts and return values.
 *
 *   fixture work N THREADS            fx_work(i) for i in 0..N in each of THREADS threads
 *   fixture glob N                    N rounds of fx_alpha x1, fx_beta x2, fx_gamma x3,
 *                                     fx_work x1
 *   fixture gate GO DONE STOP N T     waits for the file GO; then fx_work(i), i in 0..N,
 *                                     in each of T threads; writes the sum of the return
 *                                     values to DONE; waits for STOP; exits 0
 *   fixture until STOP                fx_work in a loop until the file STOP exists;
 *                                     prints the number of calls
 *   fixture alloc N THREADS           in each of THREADS threads, N rounds of the C
 *                                     library's allocator and a few other functions:
 *                                     malloc, calloc, realloc, free x3, strdup, getenv,
 *                                     clock_gettime; then read(2) of /dev/zero once
 *
 * Standard output: one line with the sum of fx_work's return values (work, glob) or
 * the number of calls (until), so a traced run can be compared with an untraced one.
 * The waits poll a file (synchronization by files: no test assumes a timing).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) long fx_work(long x) {
    __asm__ volatile("" ::: "memory");
    return 3 * x + 1;
}

__attribute__((noinline)) long fx_alpha(long x) {
    __asm__ volatile("" ::: "memory");
    return x + 1;
}
/* An alias: the glob fx_*a matches both names at one address, one probe. */
long fx_delta_a(long x) __attribute__((alias("fx_alpha")));

__attribute__((noinline)) long fx_beta(long x) {
    __asm__ volatile("" ::: "memory");
    return x + 2;
}

__attribute__((noinline)) long fx_gamma(long x) {
    __asm__ volatile("" ::: "memory");
    return x + 3;
}

static long per_thread;

static void *worker(void *arg) {
    (void)arg;
    long s = 0;
    for (long i = 0; i < per_thread; i++) s += fx_work(i);
    return (void *)s;
}

static long run_threads_of(void *(*body)(void *), long n, int threads) {
    pthread_t t[64];
    per_thread = n;
    if (threads > 64) threads = 64;
    for (int i = 0; i < threads; i++) pthread_create(&t[i], 0, body, 0);
    long sum = 0;
    for (int i = 0; i < threads; i++) {
        void *r;
        pthread_join(t[i], &r);
        sum += (long)r;
    }
    return sum;
}

static long run_threads(long n, int threads) { return run_threads_of(worker, n, threads); }

static void *allocator(void *arg) {
    (void)arg;
    long s = 0;
    for (long i = 0; i < per_thread; i++) {
        char *p = malloc(16 + i % 200);
        long *c = calloc(4, sizeof(long));
        p = realloc(p, 300 + i % 50);
        char *d = strdup("fixture");
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        s += (getenv("FX_SURELY_UNSET") == 0) + (long)strlen(d) + c[0] + (p != 0);
        free(d);
        free(c);
        free(p);
    }
    return (void *)s;
}

static void wait_for(const char *path) {
    struct timespec ms = {0, 1000000};
    while (access(path, F_OK) != 0) nanosleep(&ms, 0);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "work") && argc == 4) {
        printf("%ld\n", run_threads(atol(argv[2]), atoi(argv[3])));
        return 0;
    }
    if (!strcmp(mode, "glob") && argc == 3) {
        long n = atol(argv[2]), s = 0;
        for (long i = 0; i < n; i++) {
            s += fx_alpha(i);
            s += fx_beta(i) + fx_beta(i);
            s += fx_gamma(i) + fx_gamma(i) + fx_gamma(i);
            s += fx_work(i);
        }
        printf("%ld\n", s);
        return 0;
    }
    if (!strcmp(mode, "gate") && argc == 7) {
        wait_for(argv[2]);
        long sum = run_threads(atol(argv[5]), atoi(argv[6]));
        FILE *f = fopen(argv[3], "w");
        fprintf(f, "%ld\n", sum);
        fclose(f);
        wait_for(argv[4]);
        return 0;
    }
    if (!strcmp(mode, "alloc") && argc == 4) {
        long sum = run_threads_of(allocator, atol(argv[2]), atoi(argv[3]));
        char buf[8];
        FILE *z = fopen("/dev/zero", "r");
        sum += z && fread(buf, 1, sizeof buf, z) == sizeof buf;
        if (z) fclose(z);
        printf("%ld\n", sum);
        return 0;
    }
    if (!strcmp(mode, "until") && argc == 3) {
        long calls = 0, s = 0;
        while (access(argv[2], F_OK) != 0) {
            for (int i = 0; i < 100; i++, calls++) s += fx_work(i);
        }
        printf("%ld %ld\n", calls, s > 0 ? 1L : 0L);
        return 0;
    }
    fprintf(stderr, "usage: fixture work N THREADS | glob N | gate GO DONE STOP N T | until STOP"
                    " | alloc N THREADS\n");
    return 2;
}
