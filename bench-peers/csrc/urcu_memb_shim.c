/*
 * liburcu-memb, as a C user would call it: the read side inlined
 * (_LGPL_SOURCE), so the benchmark compares fast path against fast path.
 * Loops are written in C so that no FFI call sits inside a measured read
 * section.
 */
#define _LGPL_SOURCE
#include <time.h>
#include <urcu/urcu-memb.h>

void bp_urcu_register_thread(void) { urcu_memb_register_thread(); }

void bp_urcu_unregister_thread(void) { urcu_memb_unregister_thread(); }

void bp_urcu_synchronize(void) { urcu_memb_synchronize_rcu(); }

/* One read pair: lock, dereference the published pointer, unlock. */
static inline long read_pair(long *const *published)
{
	long *p;
	long v;

	urcu_memb_read_lock();
	p = rcu_dereference(*published);
	v = CMM_LOAD_SHARED(*p);
	urcu_memb_read_unlock();
	return v;
}

/* `n` read pairs. */
long bp_urcu_read_pairs(long *const *published, unsigned long n)
{
	long acc = 0;
	unsigned long i;

	for (i = 0; i < n; i++)
		acc += read_pair(published);
	return acc;
}

/* Read pairs until `*stop` becomes non-zero: a busy reader. */
long bp_urcu_read_until(long *const *published, const int *stop)
{
	long acc = 0;

	while (!CMM_LOAD_SHARED(*stop))
		acc += read_pair(published);
	return acc;
}

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/*
 * Read sections that each last `hold_ns` (spinning inside), until `*stop`
 * becomes non-zero: a slow reader that grace periods must wait for.
 */
long bp_urcu_read_slow_until(long *const *published, const int *stop, long hold_ns)
{
	long acc = 0;

	while (!CMM_LOAD_SHARED(*stop)) {
		long long until = now_ns() + hold_ns;
		long *p;

		urcu_memb_read_lock();
		p = rcu_dereference(*published);
		acc += CMM_LOAD_SHARED(*p);
		while (now_ns() < until)
			caa_cpu_relax();
		urcu_memb_read_unlock();
	}
	return acc;
}
