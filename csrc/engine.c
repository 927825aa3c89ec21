/* The engine's public API (engine.h): life cycle, the route registry and the
 * commands that make the workers act on it, stats. Nothing in the engine calls up
 * into this file; it calls down into route.c, worker.c, log.c and util.c. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

void s2_tuning_defaults(s2_tuning *t) {
    memset(t, 0, sizeof *t);
    t->pipe_size = 1 << 20;
    t->tls_buffer_size = 256 << 10;
    t->nodelay = 1;
    t->backlog = 1024;
    t->connect_timeout = 10.0;
    t->tls_key_update_bytes = (uint64_t)1 << 36;
}

/* ---- commands ---------------------------------------------------------- */

static void cmd_init(struct cmd *c, int type, struct route *r) {
    memset(c, 0, sizeof *c);
    c->type = type;
    c->route = r;
    pthread_mutex_init(&c->m, NULL);
    pthread_cond_init(&c->cv, NULL);
}

static void cmd_destroy(struct cmd *c) {
    pthread_mutex_destroy(&c->m);
    pthread_cond_destroy(&c->cv);
}

/* Post to every started worker (all of them, but while s2_engine_new fails half way)
 * and wait until each ran it. */
static int cmd_run_all(struct s2_engine *e, struct cmd *c) {
    struct cmd_node *nodes = calloc((size_t)e->nworkers, sizeof *nodes);
    if (!nodes) return -1;
    c->pending = 0;
    for (int i = 0; i < e->nworkers; i++) c->pending += e->w[i].started;
    for (int i = 0; i < e->nworkers; i++) {
        if (!e->w[i].started) continue;
        nodes[i].cmd = c;
        worker_post(&e->w[i], &nodes[i]);
    }
    pthread_mutex_lock(&c->m);
    while (c->pending > 0) pthread_cond_wait(&c->cv, &c->m);
    pthread_mutex_unlock(&c->m);
    free(nodes);
    return 0;
}

/* ---- lifecycle --------------------------------------------------------- */

int s2_engine_new(const s2_tuning *t, s2_engine **out, char *err, size_t errlen) {
    *out = NULL;
    if (t->workers < 0 || t->pipe_size < 0 || t->tls_buffer_size < 0 || t->connect_timeout <= 0 ||
        t->idle_timeout < 0 || t->backlog < 0) {
        s2_seterr(err, errlen, "the engine tuning has a negative or zero value where none is allowed");
        return S2_ERR_INVALID;
    }
    struct aesgcm_choice aes;
    int aes_rc = aesgcm_choose(t->tls_aes_gcm, &aes, err, errlen);
    if (aes_rc != S2_OK) return aes_rc;
    s2_engine *e = calloc(1, sizeof *e);
    if (!e) {
        s2_seterr(err, errlen, "out of memory starting the engine");
        return S2_ERR_INTERNAL;
    }
    e->t = *t;
    e->aes = aes;
    if (e->t.pipe_size == 0) e->t.pipe_size = 1 << 20;
    if (e->t.tls_buffer_size < 16384) e->t.tls_buffer_size = e->t.tls_buffer_size ? 16384 : 256 << 10;
    if (e->t.backlog == 0) e->t.backlog = 1024;
    e->nworkers = t->workers;
    if (e->nworkers == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        e->nworkers = n > 0 ? (int)n : 1;
    }
    pthread_mutex_init(&e->rlock, NULL);
    pthread_mutex_init(&e->loglock, NULL);
    pthread_mutex_init(&e->ulock, NULL);
    pthread_cond_init(&e->ucv, NULL);
    atomic_store(&e->next_conn_id, 1);
    e->w = calloc((size_t)e->nworkers, sizeof *e->w);
    if (!e->w) {
        s2_seterr(err, errlen, "out of memory starting the engine");
        s2_engine_free(e);
        return S2_ERR_INTERNAL;
    }
    for (int i = 0; i < e->nworkers; i++) {
        struct worker *w = &e->w[i];
        w->e = e;
        w->idx = i;
        w->epfd = -1;
        w->evfd = -1;
        w->reserve_fd = -1;
        w->evfd_kind = TAG_EVENTFD;
        w->next_check = INT64_MAX;
        pthread_mutex_init(&w->qlock, NULL);
    }
    for (int i = 0; i < e->nworkers; i++) {
        struct worker *w = &e->w[i];
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        w->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        w->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &w->evfd_kind};
        if (w->epfd < 0 || w->evfd < 0 || epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->evfd, &ev) < 0) {
            s2_seterr(err, errlen, "could not create the worker event loop: %s", strerror(errno));
            s2_engine_free(e);
            return S2_ERR_INTERNAL;
        }
        int rc = pthread_create(&w->th, NULL, worker_main, w);
        if (rc != 0) {
            s2_seterr(err, errlen, "could not start a worker thread: %s", strerror(rc));
            s2_engine_free(e);
            return S2_ERR_INTERNAL;
        }
        w->started = 1;
    }
    s2_log(e, S2_LOG_INFO, "TLS 1.3 AES-GCM by %s", aes.name);
    *out = e;
    return S2_OK;
}

int s2_engine_workers(const s2_engine *e) { return e->nworkers; }

/* ---- lifetime ----------------------------------------------------------
 * Every public call that touches routes, workers or connections runs between
 * engine_enter and engine_leave; s2_engine_close waits until none is in progress.
 * The handle's memory is freed only by s2_engine_free, which the owner calls when
 * no thread can be in a call any more (the Python binding: when the last reference
 * to the wrapper goes, and every call in progress holds one). */

/* 0: go on (and call engine_leave after); -1: the engine is closed. */
static int engine_enter(struct s2_engine *e) {
    pthread_mutex_lock(&e->ulock);
    int open = e->state == ENGINE_OPEN;
    if (open) e->users++;
    pthread_mutex_unlock(&e->ulock);
    return open ? 0 : -1;
}

static void engine_leave(struct s2_engine *e) {
    pthread_mutex_lock(&e->ulock);
    if (--e->users == 0 && e->state != ENGINE_OPEN) pthread_cond_broadcast(&e->ucv);
    pthread_mutex_unlock(&e->ulock);
}

static int closed_err(char *err, size_t errlen) {
    s2_seterr(err, errlen, "the engine is closed");
    return S2_ERR_CLOSED;
}

/* Stop the started workers (each closes its connections first) and join them. */
static void workers_stop(struct s2_engine *e) {
    int any = 0;
    for (int i = 0; e->w && i < e->nworkers; i++) any |= e->w[i].started;
    if (!any) return;
    struct cmd c;
    cmd_init(&c, CMD_STOP, NULL);
    cmd_run_all(e, &c);
    cmd_destroy(&c);
    for (int i = 0; i < e->nworkers; i++) {
        if (e->w[i].started) pthread_join(e->w[i].th, NULL);
        e->w[i].started = 0;
    }
}

void s2_engine_close(s2_engine *e) {
    pthread_mutex_lock(&e->ulock);
    if (e->state != ENGINE_OPEN) {
        while (e->state != ENGINE_CLOSED) pthread_cond_wait(&e->ucv, &e->ulock);
        pthread_mutex_unlock(&e->ulock);
        return;
    }
    e->state = ENGINE_CLOSING;
    atomic_store(&e->closing, 1);
    while (e->users > 0) pthread_cond_wait(&e->ucv, &e->ulock);
    pthread_mutex_unlock(&e->ulock);
    /* No call is in progress and none can start: the registry and the workers are ours. */
    workers_stop(e);
    for (int i = 0; e->w && i < e->nworkers; i++) {
        struct worker *w = &e->w[i];
        if (w->epfd >= 0) close(w->epfd);
        if (w->evfd >= 0) close(w->evfd);
        if (w->reserve_fd >= 0) close(w->reserve_fd);
        w->epfd = w->evfd = w->reserve_fd = -1;
    }
    struct route *r = e->routes;
    e->routes = NULL;
    while (r) {
        struct route *next = r->next;
        if (r->listen_fd >= 0) close(r->listen_fd);
        r->listen_fd = -1;
        route_unref(r);
        r = next;
    }
    pthread_mutex_lock(&e->ulock);
    e->state = ENGINE_CLOSED;
    pthread_cond_broadcast(&e->ucv);
    pthread_mutex_unlock(&e->ulock);
}

void s2_engine_free(s2_engine *e) {
    if (!e) return;
    s2_engine_close(e);
    for (int i = 0; e->w && i < e->nworkers; i++) pthread_mutex_destroy(&e->w[i].qlock);
    free(e->w);
    pthread_mutex_destroy(&e->rlock);
    pthread_mutex_destroy(&e->loglock);
    pthread_mutex_destroy(&e->ulock);
    pthread_cond_destroy(&e->ucv);
    free(e);
}

/* ---- routes ------------------------------------------------------------ */

static int route_add(s2_engine *e, const s2_route_spec *spec, char *bound, size_t boundlen, char *err,
                     size_t errlen) {
    struct route *r;
    int rc = route_new(e, spec, &r, err, errlen);
    if (rc != S2_OK) return rc;
    pthread_mutex_lock(&e->rlock);
    if (route_find(e, spec->route_id)) {
        pthread_mutex_unlock(&e->rlock);
        s2_seterr(err, errlen, "route %s already exists", spec->route_id);
        route_unref(r);
        return S2_ERR_EXISTS;
    }
    rc = route_listen(r, spec, err, errlen);
    if (rc != S2_OK) {
        pthread_mutex_unlock(&e->rlock);
        route_unref(r);
        return rc;
    }
    atomic_store(&r->accepting, 1);
    struct cmd c;
    cmd_init(&c, CMD_ADD_LISTENER, r);
    if (cmd_run_all(e, &c) < 0 || c.failed) {
        struct cmd d;
        cmd_init(&d, CMD_DEL_LISTENER, r);
        cmd_run_all(e, &d);
        cmd_destroy(&d);
        cmd_destroy(&c);
        pthread_mutex_unlock(&e->rlock);
        s2_seterr(err, errlen, "could not watch the listening socket of route %s", spec->route_id);
        route_unref(r);
        return S2_ERR_INTERNAL;
    }
    cmd_destroy(&c);
    r->next = e->routes;
    e->routes = r;
    if (bound && boundlen) snprintf(bound, boundlen, "%s", r->bound);
    pthread_mutex_unlock(&e->rlock);
    s2_log(e, S2_LOG_INFO, "route %s listening on %s", r->id, r->bound);
    return S2_OK;
}

static int route_retarget(s2_engine *e, const char *route_id, const s2_target_spec *targets, int ntargets,
                          char *err, size_t errlen) {
    if (ntargets <= 0) {
        s2_seterr(err, errlen, "route %s needs at least one target", route_id);
        return S2_ERR_INVALID;
    }
    struct targets tg;
    int rc = targets_build(&tg, targets, ntargets, err, errlen);
    if (rc != S2_OK) return rc;
    pthread_mutex_lock(&e->rlock);
    struct route *r = route_find(e, route_id);
    if (!r) {
        pthread_mutex_unlock(&e->rlock);
        targets_free(&tg);
        s2_seterr(err, errlen, "no route %s", route_id);
        return S2_ERR_NOT_FOUND;
    }
    pthread_mutex_lock(&r->tlock);
    struct targets old = r->tg;
    r->tg = tg;
    pthread_mutex_unlock(&r->tlock);
    pthread_mutex_unlock(&e->rlock);
    targets_free(&old);
    return S2_OK;
}

static int route_remove(s2_engine *e, const char *route_id, int drain, char *err, size_t errlen) {
    pthread_mutex_lock(&e->rlock);
    struct route **pp = &e->routes;
    while (*pp && strcmp((*pp)->id, route_id) != 0) pp = &(*pp)->next;
    struct route *r = *pp;
    if (!r) {
        pthread_mutex_unlock(&e->rlock);
        s2_seterr(err, errlen, "no route %s", route_id);
        return S2_ERR_NOT_FOUND;
    }
    *pp = r->next;
    atomic_store(&r->accepting, 0);
    struct cmd c;
    cmd_init(&c, drain ? CMD_DEL_LISTENER : CMD_CLOSE_ROUTE_CONNS, r);
    int rc = cmd_run_all(e, &c);
    cmd_destroy(&c);
    /* No worker watches the listener any more: closing it now refuses new peers. */
    if (rc == 0 && r->listen_fd >= 0) {
        close(r->listen_fd);
        r->listen_fd = -1;
    }
    pthread_mutex_unlock(&e->rlock);
    route_log_flush(r, 1);
    s2_log(e, S2_LOG_INFO, "route %s removed%s", route_id, drain ? " (draining)" : "");
    route_unref(r);
    return S2_OK;
}

static int engine_drain(s2_engine *e, double timeout) {
    pthread_mutex_lock(&e->rlock);
    for (struct route *r = e->routes; r; r = r->next) {
        if (!atomic_exchange(&r->accepting, 0)) continue;
        struct cmd c;
        cmd_init(&c, CMD_DEL_LISTENER, r);
        int rc = cmd_run_all(e, &c);
        cmd_destroy(&c);
        if (rc == 0 && r->listen_fd >= 0) {
            close(r->listen_fd); /* new peers are refused, not left in the backlog */
            r->listen_fd = -1;
        }
    }
    pthread_mutex_unlock(&e->rlock);
    int64_t end = timeout < 0 ? INT64_MAX : mono_ns() + (int64_t)(timeout * 1e9);
    for (;;) {
        if (atomic_load(&e->active) == 0) return 1;
        /* A close waits for this call: give up at once, the streams are being cut. */
        if (atomic_load(&e->closing) || mono_ns() >= end) return 0;
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* ---- stats ------------------------------------------------------------- */

static void route_stats_fill(struct route *r, s2_route_stats *rs) {
    rs->route_id = strdup(r->id);
    snprintf(rs->bound, sizeof rs->bound, "%s", r->bound);
    pthread_mutex_lock(&r->tlock);
    rs->targets = calloc((size_t)r->tg.n, sizeof *rs->targets);
    if (rs->targets) {
        for (int i = 0; i < r->tg.n; i++) rs->targets[i] = strdup(r->tg.v[i].text);
        rs->ntargets = r->tg.n;
    }
    pthread_mutex_unlock(&r->tlock);
    rs->bytes_to_target = atomic_load_explicit(&r->bytes_to, memory_order_relaxed);
    rs->bytes_from_target = atomic_load_explicit(&r->bytes_from, memory_order_relaxed);
    rs->connections_active = atomic_load_explicit(&r->active, memory_order_relaxed);
    rs->connections_total = atomic_load_explicit(&r->total, memory_order_relaxed);
    rs->tls_key_updates = atomic_load_explicit(&r->key_updates, memory_order_relaxed);
    for (int k = 0; k < S2_E_COUNT; k++)
        rs->errors[k] = atomic_load_explicit(&r->errors[k], memory_order_relaxed);
    rs->started_at = r->started_at;
}

static int engine_stats(s2_engine *e, const char *route_id, int with_conns, s2_stats **out, char *err,
                        size_t errlen) {
    *out = NULL;
    s2_stats *s = calloc(1, sizeof *s);
    if (!s) {
        s2_seterr(err, errlen, "out of memory");
        return S2_ERR_INTERNAL;
    }
    s->workers = e->nworkers;
    pthread_mutex_lock(&e->rlock);
    size_t n = 0;
    for (struct route *r = e->routes; r; r = r->next)
        if (!route_id || strcmp(r->id, route_id) == 0) n++;
    if (route_id && n == 0) {
        pthread_mutex_unlock(&e->rlock);
        free(s);
        s2_seterr(err, errlen, "no route %s", route_id);
        return S2_ERR_NOT_FOUND;
    }
    s->routes = calloc(n ? n : 1, sizeof *s->routes);
    if (!s->routes) {
        pthread_mutex_unlock(&e->rlock);
        free(s);
        s2_seterr(err, errlen, "out of memory");
        return S2_ERR_INTERNAL;
    }
    struct route **rv = calloc(n ? n : 1, sizeof *rv);
    size_t i = 0;
    for (struct route *r = e->routes; r && rv; r = r->next)
        if (!route_id || strcmp(r->id, route_id) == 0) {
            rv[i] = r;
            route_stats_fill(r, &s->routes[i++]);
        }
    s->nroutes = i;
    if (with_conns && rv) {
        struct cmd c;
        cmd_init(&c, CMD_SNAPSHOT, route_id ? rv[0] : NULL);
        cmd_run_all(e, &c);
        /* Hand each connection to its route's entry. */
        for (size_t k = 0; k < i; k++) {
            size_t m = 0;
            for (size_t j = 0; j < c.nconns; j++) m += c.conn_routes[j] == rv[k];
            s->routes[k].conns = calloc(m ? m : 1, sizeof(s2_conn_stats));
            if (!s->routes[k].conns) continue;
            for (size_t j = 0; j < c.nconns; j++)
                if (c.conn_routes[j] == rv[k]) {
                    s->routes[k].conns[s->routes[k].nconns++] = c.conns[j];
                    c.conns[j].target = NULL;
                }
        }
        for (size_t j = 0; j < c.nconns; j++) free(c.conns[j].target);
        free(c.conns);
        free(c.conn_routes);
        cmd_destroy(&c);
    }
    pthread_mutex_unlock(&e->rlock);
    free(rv);
    *out = s;
    return S2_OK;
}

void s2_stats_free(s2_stats *s) {
    if (!s) return;
    for (size_t i = 0; i < s->nroutes; i++) {
        s2_route_stats *rs = &s->routes[i];
        free(rs->route_id);
        for (int k = 0; k < rs->ntargets; k++) free(rs->targets[k]);
        free(rs->targets);
        for (size_t k = 0; k < rs->nconns; k++) free(rs->conns[k].target);
        free(rs->conns);
    }
    free(s->routes);
    free(s);
}

/* ---- the public calls: each one inside engine_enter/engine_leave -------- */

int s2_route_add(s2_engine *e, const s2_route_spec *spec, char *bound, size_t boundlen, char *err,
                 size_t errlen) {
    if (engine_enter(e) < 0) return closed_err(err, errlen);
    int rc = route_add(e, spec, bound, boundlen, err, errlen);
    engine_leave(e);
    return rc;
}

int s2_route_retarget(s2_engine *e, const char *route_id, const s2_target_spec *targets, int ntargets,
                      char *err, size_t errlen) {
    if (engine_enter(e) < 0) return closed_err(err, errlen);
    int rc = route_retarget(e, route_id, targets, ntargets, err, errlen);
    engine_leave(e);
    return rc;
}

int s2_route_remove(s2_engine *e, const char *route_id, int drain, char *err, size_t errlen) {
    if (engine_enter(e) < 0) return closed_err(err, errlen);
    int rc = route_remove(e, route_id, drain, err, errlen);
    engine_leave(e);
    return rc;
}

int s2_engine_drain(s2_engine *e, double timeout) {
    if (engine_enter(e) < 0) return -1;
    int rc = engine_drain(e, timeout);
    engine_leave(e);
    return rc;
}

int s2_engine_stats(s2_engine *e, const char *route_id, int with_conns, s2_stats **out, char *err,
                    size_t errlen) {
    *out = NULL;
    if (engine_enter(e) < 0) return closed_err(err, errlen);
    int rc = engine_stats(e, route_id, with_conns, out, err, errlen);
    engine_leave(e);
    return rc;
}

void s2_engine_drain_logs(s2_engine *e, s2_log_sink sink, void *ud) {
    /* Sum up the intervals that are over; if a control command holds the registry, the
     * next drain does. A closed engine has no routes left, only lines to hand out. */
    if (engine_enter(e) == 0) {
        if (pthread_mutex_trylock(&e->rlock) == 0) {
            for (struct route *r = e->routes; r; r = r->next) route_log_flush(r, 0);
            pthread_mutex_unlock(&e->rlock);
        }
        engine_leave(e);
    }
    log_drain(e, sink, ud);
}

void s2_engine_resources(s2_engine *e, s2_resources *out) {
    out->fds = atomic_load(&e->dbg_fds);
    out->pipes = atomic_load(&e->dbg_pipes);
    out->ssl_objects = atomic_load(&e->dbg_ssl);
    out->connections = atomic_load(&e->dbg_conns);
}
