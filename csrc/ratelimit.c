/* Per-route token bucket shared by all workers, lock-free (GCRA).
 *
 * The state is one atomic: the time at which every byte granted so far is
 * paid for at `rate`. Credit is "now - tat", capped at the burst; a grant
 * moves tat forward by its cost. Exact over any interval, whatever the
 * number of workers taking from it.
 */
#include "internal.h"

#define MIN_GRANT 4096 /* below this, wait instead of moving crumbs */

static int64_t cost_ns(const struct bucket *b, size_t n) {
    return (int64_t)(((unsigned __int128)n * S2_NS + b->rate - 1) / b->rate);
}

void bucket_init(struct bucket *b, uint64_t rate, int64_t now) {
    b->rate = rate;
    if (!rate) {
        b->burst_ns = 0;
        atomic_store(&b->tat, 0);
        return;
    }
    uint64_t burst = rate / 10;
    if (burst < 16384) burst = 16384;
    b->burst_ns = cost_ns(b, burst);
    atomic_store(&b->tat, now - b->burst_ns); /* start with a full bucket */
}

size_t bucket_take(struct bucket *b, size_t want, int64_t now, int64_t *wait_ns) {
    int64_t tat = atomic_load_explicit(&b->tat, memory_order_relaxed);
    size_t min_grant = want < MIN_GRANT ? want : MIN_GRANT;
    for (;;) {
        int64_t base = tat > now - b->burst_ns ? tat : now - b->burst_ns;
        int64_t credit_ns = now - base;
        uint64_t avail =
            credit_ns > 0 ? (uint64_t)(((unsigned __int128)credit_ns * b->rate) / S2_NS) : 0;
        if (avail < min_grant) {
            int64_t w = cost_ns(b, min_grant) - (credit_ns > 0 ? credit_ns : 0);
            if (credit_ns < 0) w -= credit_ns;
            *wait_ns = w < 1000000 ? 1000000 : w; /* the loop sleeps in ms anyway */
            return 0;
        }
        size_t grant = avail < want ? (size_t)avail : want;
        if (atomic_compare_exchange_weak_explicit(&b->tat, &tat, base + cost_ns(b, grant),
                                                  memory_order_relaxed, memory_order_relaxed))
            return grant;
    }
}

void bucket_refund(struct bucket *b, size_t n) {
    atomic_fetch_sub_explicit(&b->tat, cost_ns(b, n), memory_order_relaxed);
}
