/* The Frida peer of the runtime bench's jump-optimized kprobe (issue 15):
 * `fr_work` has the same bytes as the bench's `rb_jump` (mov eax, edi;
 * add eax, 1; ret). The program times rounds of N calls, unprobed, then
 * waits for the file GO (the driver creates it once Frida's listener is
 * attached) and times the same rounds probed; it prints the median ns per
 * call of each and the number of calls it made while probed, then waits
 * for the file END (the driver reads Frida's count first).
 *
 *   target N ROUNDS GO END
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

__asm__(".text\n.p2align 4\n.globl fr_work\n.type fr_work,@function\nfr_work:\n"
        ".byte 0x89, 0xf8\n"             /* mov eax, edi */
        ".byte 0x83, 0xc0, 0x01, 0xc3\n" /* add eax, 1; ret */
        ".size fr_work, . - fr_work\n");
unsigned fr_work(unsigned x);

/* Called through a volatile pointer: the compiler cannot inline it. */
static unsigned (*volatile work)(unsigned) = fr_work;

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median_round(long n, int rounds, unsigned *sink) {
    double v[64];
    for (int r = 0; r < rounds && r < 64; r++) {
        double t = now_ns();
        for (long i = 0; i < n; i++) *sink += work((unsigned)i);
        v[r] = (now_ns() - t) / n;
    }
    qsort(v, rounds, sizeof v[0], cmp);
    return v[rounds / 2];
}

int main(int argc, char **argv) {
    if (argc < 5) return 2;
    long n = atol(argv[1]);
    int rounds = atoi(argv[2]);
    unsigned sink = 0;
    double plain = median_round(n, rounds, &sink);
    printf("ready\n");
    fflush(stdout);
    while (access(argv[3], F_OK) != 0) usleep(1000);
    double probed = median_round(n, rounds, &sink);
    printf("plain %.2f probed %.2f calls %ld sink %u\n", plain, probed, n * rounds, sink);
    fflush(stdout);
    while (access(argv[4], F_OK) != 0) usleep(1000);
    return 0;
}
