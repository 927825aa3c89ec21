/* Engine log lines: a bounded ring the owner drains (never printed here), and the
 * per-route, per-error-kind rate limit of lines about single connections. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

const char *const s2_error_kind_names[S2_E_COUNT] = {
    "accept", "connect_refused", "connect_timeout", "connect_error", "tls_handshake",
    "reset", "idle_timeout", "max_connections", "io",
};

/* Queue one line; loglock held. */
static void log_vpush(struct s2_engine *e, int level, const char *fmt, va_list ap) {
    if (e->log_count == S2_LOG_RING) {
        e->log_dropped++;
        return;
    }
    struct log_entry *le = &e->logs[(e->log_head + e->log_count) % S2_LOG_RING];
    vsnprintf(le->msg, sizeof le->msg, fmt, ap);
    le->level = level;
    e->log_count++;
}

static void log_push(struct s2_engine *e, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void log_push(struct s2_engine *e, int level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    log_vpush(e, level, fmt, ap);
    va_end(ap);
}

void s2_log(struct s2_engine *e, int level, const char *fmt, ...) {
    va_list ap;
    pthread_mutex_lock(&e->loglock);
    va_start(ap, fmt);
    log_vpush(e, level, fmt, ap);
    va_end(ap);
    pthread_mutex_unlock(&e->loglock);
}

/* End r's interval of kind: one line for what it did not log; loglock held. */
static void loglimit_end(struct route *r, int kind, int64_t now) {
    struct loglimit *l = &r->loglim[kind];
    if (l->suppressed)
        log_push(r->e, l->level,
                 "route %s: %u more %s errors in the last %.1f s (each counted in the route's errors)", r->id,
                 l->suppressed, s2_error_kind_names[kind], (double)(now - l->start) / S2_NS);
    memset(l, 0, sizeof *l);
}

void s2_log_route(struct route *r, int kind, int level, const char *fmt, ...) {
    struct s2_engine *e = r->e;
    int64_t now = mono_ns();
    pthread_mutex_lock(&e->loglock);
    struct loglimit *l = &r->loglim[kind];
    if (l->logged && now - l->start >= (int64_t)S2_LOG_WINDOW_S * S2_NS) loglimit_end(r, kind, now);
    if (!l->logged) l->start = now;
    if (l->logged < S2_LOG_BURST) {
        l->logged++;
        va_list ap;
        va_start(ap, fmt);
        log_vpush(e, level, fmt, ap);
        va_end(ap);
    } else {
        l->suppressed++;
        if (level > l->level) l->level = level;
    }
    pthread_mutex_unlock(&e->loglock);
}

void route_log_flush(struct route *r, int force) {
    int64_t now = mono_ns();
    pthread_mutex_lock(&r->e->loglock);
    for (int k = 0; k < S2_E_COUNT; k++) {
        const struct loglimit *l = &r->loglim[k];
        if (l->logged && (force || now - l->start >= (int64_t)S2_LOG_WINDOW_S * S2_NS))
            loglimit_end(r, k, now);
    }
    pthread_mutex_unlock(&r->e->loglock);
}

void log_drain(struct s2_engine *e, s2_log_sink sink, void *ud) {
    for (;;) {
        struct log_entry le;
        unsigned dropped;
        pthread_mutex_lock(&e->loglock);
        if (e->log_count == 0) {
            pthread_mutex_unlock(&e->loglock);
            return;
        }
        le = e->logs[e->log_head];
        e->log_head = (e->log_head + 1) % S2_LOG_RING;
        e->log_count--;
        dropped = e->log_dropped;
        e->log_dropped = 0;
        pthread_mutex_unlock(&e->loglock);
        if (dropped) {
            char m[80];
            snprintf(m, sizeof m, "%u engine log lines were dropped (ring full)", dropped);
            sink(ud, S2_LOG_WARNING, m);
        }
        sink(ud, le.level, le.msg);
    }
}
