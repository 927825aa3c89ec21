/* One route: its targets, listening socket, TLS configuration and counters, built from
 * a spec and freed with its last reference (the registry's or a connection's). The
 * registry itself (the list, and the commands that make workers watch a listener) is
 * engine.c's. */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

void targets_free(struct targets *tg) {
    for (int i = 0; i < tg->n; i++) free(tg->v[i].text);
    free(tg->v);
    tg->v = NULL;
    tg->n = 0;
}

int targets_build(struct targets *tg, const s2_target_spec *spec, int n, char *err, size_t errlen) {
    tg->v = calloc((size_t)n, sizeof *tg->v);
    tg->n = 0;
    if (!tg->v) {
        s2_seterr(err, errlen, "out of memory");
        return S2_ERR_INTERNAL;
    }
    for (int i = 0; i < n; i++) {
        struct target *t = &tg->v[i];
        char text[320], port[16];
        if (!spec[i].host || !*spec[i].host || spec[i].port <= 0 || spec[i].port > 65535) {
            s2_seterr(err, errlen, "target %d is not a host and a port in 1-65535", i);
            targets_free(tg);
            return S2_ERR_INVALID;
        }
        if (strchr(spec[i].host, ':'))
            snprintf(text, sizeof text, "[%s]:%d", spec[i].host, spec[i].port);
        else
            snprintf(text, sizeof text, "%s:%d", spec[i].host, spec[i].port);
        t->text = strdup(text);
        tg->n++;
        if (!t->text) {
            targets_free(tg);
            s2_seterr(err, errlen, "out of memory");
            return S2_ERR_INTERNAL;
        }
        /* Resolve once here, in the caller's thread: workers never block on DNS.
         * A name that does not resolve is kept and counted as connect_error. */
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
        struct addrinfo *res = NULL;
        snprintf(port, sizeof port, "%d", spec[i].port);
        if (getaddrinfo(spec[i].host, port, &hints, &res) == 0 && res) {
            memcpy(&t->addr, res->ai_addr, res->ai_addrlen);
            t->addrlen = res->ai_addrlen;
        }
        if (res) freeaddrinfo(res);
    }
    return S2_OK;
}

void route_unref(struct route *r) {
    if (atomic_fetch_sub(&r->refs, 1) != 1) return;
    route_log_flush(r, 1); /* what its draining connections did after its removal */
    if (r->listen_fd >= 0) close(r->listen_fd);
    targets_free(&r->tg);
    tls_conf_clear(&r->tls);
    pthread_mutex_destroy(&r->tlock);
    free(r->id);
    free(r);
}

void route_error(struct route *r, int kind) {
    atomic_fetch_add_explicit(&r->errors[kind], 1, memory_order_relaxed);
}

struct route *route_find(struct s2_engine *e, const char *id) {
    for (struct route *r = e->routes; r; r = r->next)
        if (strcmp(r->id, id) == 0) return r;
    return NULL;
}

static int open_listener(struct s2_engine *e, const s2_route_spec *spec, char *err, size_t errlen,
                         int *out_fd) {
    *out_fd = -1;
    if (spec->listen_fd >= 0) {
        int fd = fcntl(spec->listen_fd, F_DUPFD_CLOEXEC, 0);
        if (fd < 0) {
            s2_seterr(err, errlen, "cannot adopt listening socket %d: %s", spec->listen_fd, strerror(errno));
            return S2_ERR_INVALID;
        }
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 || listen(fd, e->t.backlog) < 0) {
            s2_seterr(err, errlen, "adopted socket %d cannot listen: %s", spec->listen_fd, strerror(errno));
            close(fd);
            return S2_ERR_INVALID;
        }
        *out_fd = fd;
        return S2_OK;
    }
    char port[16];
    snprintf(port, sizeof port, "%d", spec->listen_port);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    int gai = getaddrinfo(spec->listen_host && *spec->listen_host ? spec->listen_host : NULL, port,
                          &hints, &res);
    if (gai != 0 || !res) {
        s2_seterr(err, errlen, "cannot resolve listen address %s: %s", spec->listen_host, gai_strerror(gai));
        if (res) freeaddrinfo(res);
        return S2_ERR_INVALID;
    }
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        s2_seterr(err, errlen, "cannot create a socket: %s", strerror(errno));
        freeaddrinfo(res);
        return S2_ERR_INTERNAL;
    }
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) { /* best effort */ }
    if (e->t.rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &e->t.rcvbuf, sizeof e->t.rcvbuf);
    if (bind(fd, res->ai_addr, res->ai_addrlen) < 0) {
        int er = errno;
        char a[80];
        format_sockaddr(res->ai_addr, a, sizeof a);
        s2_seterr(err, errlen, "cannot listen on %s: %s", a, strerror(er));
        close(fd);
        freeaddrinfo(res);
        return er == EADDRINUSE ? S2_ERR_ADDR_IN_USE : er == EADDRNOTAVAIL || er == EACCES ? S2_ERR_INVALID
                                                                                           : S2_ERR_INTERNAL;
    }
    freeaddrinfo(res);
    if (listen(fd, e->t.backlog) < 0) {
        int er = errno;
        s2_seterr(err, errlen, "listen() failed: %s", strerror(er));
        close(fd);
        return er == EADDRINUSE ? S2_ERR_ADDR_IN_USE : S2_ERR_INTERNAL;
    }
    *out_fd = fd;
    return S2_OK;
}

int route_new(struct s2_engine *e, const s2_route_spec *spec, struct route **out, char *err, size_t errlen) {
    *out = NULL;
    if (!spec->route_id || !*spec->route_id) {
        s2_seterr(err, errlen, "a route needs a route_id");
        return S2_ERR_INVALID;
    }
    if (spec->ntargets <= 0) {
        s2_seterr(err, errlen, "route %s needs at least one target", spec->route_id);
        return S2_ERR_INVALID;
    }
    if (spec->tls_role < S2_TLS_NONE || spec->tls_role > S2_TLS_CLIENT || spec->tls_mode < S2_TLS_PSK ||
        spec->tls_mode > S2_TLS_CERT || spec->max_connections < 0) {
        s2_seterr(err, errlen, "route %s has an unknown TLS role or mode", spec->route_id);
        return S2_ERR_INVALID;
    }
    struct route *r = calloc(1, sizeof *r);
    if (!r) {
        s2_seterr(err, errlen, "out of memory");
        return S2_ERR_INTERNAL;
    }
    r->kind = TAG_LISTENER;
    r->e = e;
    r->listen_fd = -1;
    atomic_store(&r->refs, 1);
    pthread_mutex_init(&r->tlock, NULL);
    r->id = strdup(spec->route_id);
    int rc = r->id ? S2_OK : S2_ERR_INTERNAL;
    if (rc == S2_OK) rc = targets_build(&r->tg, spec->targets, spec->ntargets, err, errlen);
    int want_ktls = e->t.tls_key_update_bytes == 0;
    if (rc == S2_OK && spec->tls_role != S2_TLS_NONE) {
        rc = tls_conf_build(&r->tls, spec, want_ktls, &e->aes, err, errlen);
        if (rc == S2_OK && want_ktls)
            s2_log(e, S2_LOG_INFO, "route %s: kernel TLS %s", spec->route_id,
                   r->tls.ktls ? "on where the kernel takes the suite"
                               : "not available (no tls ULP in this kernel, or OpenSSL without it): "
                                 "records are built in user space");
    }
    if (rc != S2_OK) {
        route_unref(r);
        return rc;
    }
    r->max_conns = spec->max_connections ? spec->max_connections : e->t.max_connections;
    bucket_init(&r->bucket, spec->rate_limit, mono_ns());
    r->started_at = wall_now();
    *out = r;
    return S2_OK;
}

int route_listen(struct route *r, const s2_route_spec *spec, char *err, size_t errlen) {
    int rc = open_listener(r->e, spec, err, errlen, &r->listen_fd);
    if (rc != S2_OK) return rc;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(r->listen_fd, (struct sockaddr *)&ss, &sl) == 0)
        format_sockaddr((struct sockaddr *)&ss, r->bound, sizeof r->bound);
    return S2_OK;
}
