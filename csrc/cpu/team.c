/* The barrier of a decode step's one parallel region (see internal.h, lite_team). */
#include "internal.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#include <sched.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

/* How long a thread that arrives first waits awake before it sleeps. A decode step's longest
 * serial stretch between two phases (routing and the MoE's gather) takes ~10-20 µs; sleeping
 * and being woken costs ~10-15 µs on a VM's cores. */
#define TEAM_SPIN_NS 50000

/* Spinning pays only while the partners arrive within the spin. When another process shares a
 * core, a partner is often descheduled for milliseconds: the spinner then burns its own share
 * of the core, and the scheduler, which favours threads that slept, runs the other process
 * first; decode was 1.1-1.3x slower than with sleeping waits. So every wait of a timed team
 * (a decode step's) is timed, and while more than a quarter of recent ones (a moving average
 * over ~64) outlast the spin, threads sleep at once, as OpenMP's passive barriers do. Shared by
 * all teams: it describes the machine's load, not one call. In 1/65536ths. A prefill's waits
 * stay out of it: a 256-token prefill's MoE phases, late by their imbalance alone, left the
 * next decode steps sleeping at every wait, its first 4 tokens 1.3-3x slower. */
static _Atomic uint32_t g_late;
#define LATE_ONE 65536u
#define LATE_LIMIT (LATE_ONE / 4)

static void note_wait(int late) {
    uint32_t v = atomic_load_explicit(&g_late, memory_order_relaxed);
    v = v - v / 64 + (late ? LATE_ONE / 64 : 0);    /* races lose an update now and then: harmless */
    atomic_store_explicit(&g_late, v, memory_order_relaxed);
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void sleep_while(_Atomic uint32_t *word, uint32_t value) {
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
#else
    (void)word, (void)value;
    sched_yield();
#endif
}

static void wake_all(_Atomic uint32_t *word) {
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
#else
    (void)word;
#endif
}

void lite_team_init(lite_team *t, int timed) {
    t->timed = timed;
    /* Only the spans of the threads a region will ask for (a decode's per-layer calls set up a
     * team each), tagged as no phase before gen 0xffff: a team makes far fewer syncs than that. */
    t->n_span = lite_num_threads() < LITE_TEAM_MAX ? lite_num_threads() : LITE_TEAM_MAX;
    for (int i = 0; i < t->n_span; i++) atomic_init(&t->span[i], (uint64_t)0xffff << 48);
    atomic_init(&t->arrived, 0);
    atomic_init(&t->gen, 0);
    atomic_init(&t->sleepers, 0);
}

void lite_team_sync(lite_team *t) {
#ifdef _OPENMP
    const uint32_t n = (uint32_t)omp_get_num_threads();   /* the team OpenMP gave, whatever was asked */
#else
    const uint32_t n = 1;
#endif
    if (n <= 1) {   /* no one to wait for; the generation still counts phases for lite_share */
        atomic_fetch_add_explicit(&t->gen, 1, memory_order_relaxed);
        return;
    }
    const uint32_t g = atomic_load_explicit(&t->gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&t->arrived, 1, memory_order_acq_rel) == n - 1) {
        atomic_store_explicit(&t->arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&t->gen, 1, memory_order_seq_cst);
        /* A waiter counts itself a sleeper before the kernel compares gen: either this load sees
         * it, or its futex call sees the new gen and returns at once. */
        if (atomic_load_explicit(&t->sleepers, memory_order_seq_cst)) wake_all(&t->gen);
        return;
    }
    const int64_t t0 = now_ns();
    if (atomic_load_explicit(&g_late, memory_order_relaxed) < LATE_LIMIT)
        for (int i = 1; atomic_load_explicit(&t->gen, memory_order_acquire) == g; i++) {
            CPU_RELAX();
            if (i % 64 == 0 && now_ns() - t0 > TEAM_SPIN_NS) break;
        }
    while (atomic_load_explicit(&t->gen, memory_order_acquire) == g) {
        atomic_fetch_add_explicit(&t->sleepers, 1, memory_order_seq_cst);
        sleep_while(&t->gen, g);
        atomic_fetch_sub_explicit(&t->sleepers, 1, memory_order_seq_cst);
    }
    if (t->timed) note_wait(now_ns() - t0 > TEAM_SPIN_NS);
}

/* A share is one word, (tag, first, end): its owner takes from the front and others from the
 * back by compare-and-swap, so no item goes twice. The tag is the team's barrier generation,
 * the same for every thread between two syncs: a share whose tag is old belongs to an earlier
 * phase, and whoever comes first (its owner or another thread) sets it to the owner's portion
 * of this one. Items up to 2^24 a phase. */
#define SHARE_CHUNK 4   /* items a take: a decode's items stream ~50 KB each */
#define SHARE_BITS 24
#define SHARE_MASK ((1u << SHARE_BITS) - 1)

static uint64_t share_word(uint32_t tag, uint64_t lo, uint64_t hi) {
    return (uint64_t)(tag & 0xffff) << 48 | lo << SHARE_BITS | hi;
}

/* Thread i's portion [*a, *b) of the phase's items: its share before any is taken, and all it
 * takes where the spans do not serve. */
static void portion(const lite_share *s, uint32_t i, int64_t *a, int64_t *b) {
    *a = s->n * i / s->nth, *b = s->n * (i + 1) / s->nth;
}

/* Share i's word for this phase, set to thread i's portion if it still holds an earlier one's. */
static uint64_t share_load(const lite_share *s, uint32_t i) {
    _Atomic uint64_t *w = &s->t->span[i];
    uint64_t v = atomic_load_explicit(w, memory_order_acquire);
    while (v >> 48 != (s->tag & 0xffff)) {
        int64_t a, b;
        portion(s, i, &a, &b);
        const uint64_t init = share_word(s->tag, (uint64_t)a, (uint64_t)b);
        if (atomic_compare_exchange_weak_explicit(w, &v, init, memory_order_acq_rel, memory_order_acquire)) return init;
    }
    return v;
}

void lite_share_begin(lite_share *s, lite_team *t, int64_t n) {
#ifdef _OPENMP
    s->me = (uint32_t)omp_get_thread_num(), s->nth = (uint32_t)omp_get_num_threads();
#else
    s->me = 0, s->nth = 1;
#endif
    s->t = t, s->n = n, s->victim = s->me;
    s->tag = atomic_load_explicit(&t->gen, memory_order_acquire);
}

int lite_share_next(lite_share *s, int64_t *a, int64_t *b) {
    if (s->n > SHARE_MASK || s->nth > (uint32_t)s->t->n_span) {   /* beyond the spans: static portions */
        if (s->victim != s->me) return 0;
        portion(s, s->me, a, b);
        s->victim = s->me + s->nth;
        return *a < *b;
    }
    for (; s->victim < s->me + s->nth; s->victim++) {
        const uint32_t i = s->victim % s->nth, own = i == s->me;
        _Atomic uint64_t *w = &s->t->span[i];
        uint64_t v = share_load(s, i);
        for (;;) {
            const uint64_t lo = v >> SHARE_BITS & SHARE_MASK, hi = v & SHARE_MASK;
            if (lo >= hi) break;
            const uint64_t c = hi - lo < SHARE_CHUNK ? hi - lo : SHARE_CHUNK;
            const uint64_t nv = own ? share_word(s->tag, lo + c, hi) : share_word(s->tag, lo, hi - c);
            if (atomic_compare_exchange_weak_explicit(w, &v, nv, memory_order_acq_rel, memory_order_acquire)) {
                *a = (int64_t)(own ? lo : hi - c), *b = (int64_t)(own ? lo + c : hi);
                return 1;
            }
        }
    }
    return 0;
}
