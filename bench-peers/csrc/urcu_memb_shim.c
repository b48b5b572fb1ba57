/*
 * liburcu-memb, as a C user would call it: the read side inlined
 * (_LGPL_SOURCE), so the benchmark compares fast path against fast path.
 * Loops are written in C so that no FFI call sits inside a measured read
 * section.
 */
#define _LGPL_SOURCE
#include <urcu/urcu-memb.h>

void bp_urcu_register_thread(void) { urcu_memb_register_thread(); }

void bp_urcu_unregister_thread(void) { urcu_memb_unregister_thread(); }

void bp_urcu_synchronize(void) { urcu_memb_synchronize_rcu(); }

/* `n` read pairs: lock, dereference the published pointer, unlock. */
long bp_urcu_read_pairs(long *const *published, unsigned long n)
{
	long acc = 0;
	unsigned long i;

	for (i = 0; i < n; i++) {
		long *p;

		urcu_memb_read_lock();
		p = rcu_dereference(*published);
		acc += CMM_LOAD_SHARED(*p);
		urcu_memb_read_unlock();
	}
	return acc;
}

/* Read pairs until `*stop` becomes non-zero: a busy reader. */
long bp_urcu_read_until(long *const *published, const int *stop)
{
	long acc = 0;

	while (!CMM_LOAD_SHARED(*stop)) {
		long *p;

		urcu_memb_read_lock();
		p = rcu_dereference(*published);
		acc += CMM_LOAD_SHARED(*p);
		urcu_memb_read_unlock();
	}
	return acc;
}
