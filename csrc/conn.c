/* A connection pair: accept, connect, TLS handshakes, timers, close.
 * The byte pumps themselves live in pump.c. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "internal.h"
#include "pump.h"

void sock_tune(struct s2_engine *e, int fd) {
    const s2_tuning *t = &e->t;
    int one = 1;
    if (t->nodelay) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (t->sndbuf > 0) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &t->sndbuf, sizeof t->sndbuf);
    if (t->rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &t->rcvbuf, sizeof t->rcvbuf);
    if (t->notsent_lowat > 0)
        setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &t->notsent_lowat, sizeof t->notsent_lowat);
    if (t->tcp_user_timeout > 0)
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &t->tcp_user_timeout, sizeof t->tcp_user_timeout);
    if (t->congestion[0] &&
        setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, t->congestion, (socklen_t)strlen(t->congestion)) < 0 &&
        !atomic_exchange(&e->congestion_warned, 1))
        s2_log(e, S2_LOG_WARNING, "congestion control %s is not available (%s); using the system default",
               t->congestion, strerror(errno));
}

void conn_set_timer(struct conn *c, int64_t at) {
    if (at > 0 && at < c->w->next_check) c->w->next_check = at;
}

static void side_close(struct s2_engine *e, struct side *s, int reset) {
    if (s->ssl) {
        SSL_free(s->ssl);
        s->ssl = NULL;
        DBG_ADD(e, ssl, -1);
    }
    if (s->fd >= 0) {
        if (reset) {
            struct linger lg = {1, 0}; /* close sends RST: the peer sees the reset it caused */
            setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        close(s->fd);
        s->fd = -1;
        DBG_ADD(e, fds, -1);
    }
}

void conn_close(struct conn *c, int reset_a, int reset_b) {
    if (c->state == ST_DEAD) return;
    struct s2_engine *e = c->w->e;
    c->state = ST_DEAD;
    side_close(e, &c->a, reset_a);
    side_close(e, &c->b, reset_b);
    for (int i = 0; i < 2; i++) dir_release(e, &c->d[i]);
    if (c->prev)
        c->prev->next = c->next;
    else
        c->w->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    c->prev = NULL;
    c->next = c->w->dead;
    c->w->dead = c;
    atomic_fetch_sub_explicit(&c->r->active, 1, memory_order_relaxed);
    atomic_fetch_sub(&e->active, 1);
}

void conn_free(struct conn *c) {
    struct s2_engine *e = c->w->e;
    free(c->target);
    route_unref(c->r);
    free(c);
    DBG_ADD(e, conns, -1);
}

static void conn_fail(struct conn *c, int kind) {
    route_error(c->r, kind);
    conn_close(c, 0, 0);
}

static int watch(struct conn *c, struct side *s) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = s};
    if (epoll_ctl(c->w->epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0) {
        s2_log_route(c->r, S2_E_IO, S2_LOG_ERROR, "route %s: epoll_ctl failed: %s", c->r->id,
                     strerror(errno));
        return -1;
    }
    return 0;
}

static void establish(struct conn *c) {
    struct s2_engine *e = c->w->e;
    c->state = ST_ESTABLISHED;
    c->deadline = 0;
    /* Edges seen during the handshake were consumed by it: let the first pump look everywhere. */
    c->a.readable = c->a.writable = c->b.readable = c->b.writable = 1;
    c->last_active = c->w->now;
    int tls = c->a.ssl || c->b.ssl;
    if (c->r->tls.ktls) tls_established(c->a.ssl ? c->a.ssl : c->b.ssl);
    for (int i = 0; i < 2; i++) {
        if (dir_setup(e, &c->d[i], !tls) < 0) {
            s2_log_route(c->r, S2_E_IO, S2_LOG_ERROR, "route %s: no memory or descriptors for a connection",
                         c->r->id);
            conn_fail(c, S2_E_IO);
            return;
        }
    }
    if (e->t.idle_timeout > 0) conn_set_timer(c, c->last_active + (int64_t)(e->t.idle_timeout * 1e9));
    conn_pump(c);
}

/* SSL_do_handshake on one side; 1 = done, 0 = in progress, -1 = failed (closed). */
static int handshake(struct conn *c, struct side *s) {
    ERR_clear_error();
    int r = SSL_do_handshake(s->ssl);
    if (r == 1) return 1;
    int err = SSL_get_error(s->ssl, r);
    /* OpenSSL flushed its flight into the gather BIO; what the socket did not take
     * yet leaves here (again on EPOLLOUT, which calls us back). */
    if ((err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) && tls_flush(s->ssl) >= 0) return 0;
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) err = SSL_ERROR_SYSCALL;
    unsigned long e = ERR_peek_error();
    char why[160];
    if (e)
        ERR_error_string_n(e, why, sizeof why);
    else
        snprintf(why, sizeof why, "%s", err == SSL_ERROR_SYSCALL ? "connection closed or reset" : "error");
    ERR_clear_error();
    s2_log_route(c->r, S2_E_TLS_HANDSHAKE, S2_LOG_WARNING, "route %s: TLS handshake with %s failed: %s",
                 c->r->id, s->is_target ? c->target : c->peer, why);
    conn_fail(c, S2_E_TLS_HANDSHAKE);
    return -1;
}

static void connected(struct conn *c) {
    struct route *r = c->r;
    if (r->tls.role == S2_TLS_CLIENT) {
        c->b.ssl = tls_new_ssl(&r->tls, c->b.fd, c->target);
        if (!c->b.ssl) {
            conn_fail(c, S2_E_TLS_HANDSHAKE);
            return;
        }
        DBG_ADD(c->w->e, ssl, 1);
        SSL_set_connect_state(c->b.ssl);
        c->state = ST_HANDSHAKE_B;
        c->deadline = c->w->now + (int64_t)(c->w->e->t.connect_timeout * 1e9);
        conn_set_timer(c, c->deadline);
        if (handshake(c, &c->b) == 1) establish(c);
        return;
    }
    establish(c);
}

static int connect_error_kind(int err) {
    if (err == ECONNREFUSED) return S2_E_CONNECT_REFUSED;
    if (err == ETIMEDOUT) return S2_E_CONNECT_TIMEOUT;
    return S2_E_CONNECT_ERROR;
}

static void connect_failed(struct conn *c, int err) {
    int kind = connect_error_kind(err);
    s2_log_route(c->r, kind, S2_LOG_WARNING, "route %s: connecting to %s failed: %s", c->r->id, c->target,
                 strerror(err));
    conn_fail(c, kind);
}

static void start_connect(struct conn *c) {
    struct s2_engine *e = c->w->e;
    if (c->taddrlen == 0) {
        s2_log_route(c->r, S2_E_CONNECT_ERROR, S2_LOG_WARNING, "route %s: target %s did not resolve",
                     c->r->id, c->target);
        conn_fail(c, S2_E_CONNECT_ERROR);
        return;
    }
    int fd = socket(c->taddr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        s2_log_route(c->r, S2_E_CONNECT_ERROR, S2_LOG_ERROR, "route %s: socket() failed: %s", c->r->id,
                     strerror(errno));
        conn_fail(c, S2_E_CONNECT_ERROR);
        return;
    }
    DBG_ADD(e, fds, 1);
    c->b.fd = fd;
    sock_tune(e, fd);
    int rc = connect(fd, (struct sockaddr *)&c->taddr, c->taddrlen);
    if (rc < 0 && errno != EINPROGRESS) {
        connect_failed(c, errno);
        return;
    }
    if (watch(c, &c->b) < 0) {
        conn_fail(c, S2_E_IO);
        return;
    }
    if (rc == 0) {
        connected(c);
        return;
    }
    c->state = ST_CONNECTING;
    c->deadline = c->w->now + (int64_t)(e->t.connect_timeout * 1e9);
    conn_set_timer(c, c->deadline);
}

void conn_accept(struct worker *w, struct route *r, int fd) {
    struct s2_engine *e = w->e;
    if (r->max_conns > 0 && atomic_load(&r->active) >= r->max_conns) {
        route_error(r, S2_E_MAX_CONNECTIONS);
        close(fd);
        DBG_ADD(e, fds, -1);
        return;
    }
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
        route_error(r, S2_E_IO);
        close(fd);
        DBG_ADD(e, fds, -1);
        return;
    }
    DBG_ADD(e, conns, 1);
    c->w = w;
    c->r = r;
    atomic_fetch_add(&r->refs, 1);
    atomic_fetch_add_explicit(&r->active, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&r->total, 1, memory_order_relaxed);
    atomic_fetch_add(&e->active, 1);
    c->id = atomic_fetch_add(&e->next_conn_id, 1);
    c->state = ST_CONNECTING;
    c->a = (struct side){.kind = TAG_SIDE, .fd = fd, .c = c, .is_target = 0};
    c->b = (struct side){.kind = TAG_SIDE, .fd = -1, .c = c, .is_target = 1};
    c->d[0].src = &c->a;
    c->d[0].dst = &c->b;
    c->d[1].src = &c->b;
    c->d[1].dst = &c->a;
    for (int i = 0; i < 2; i++) c->d[i].pipe_r = c->d[i].pipe_w = -1;
    c->started_at = wall_now();
    c->last_active = w->now;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0)
        format_sockaddr((struct sockaddr *)&ss, c->peer, sizeof c->peer);
    pthread_mutex_lock(&r->tlock);
    uint64_t k = atomic_fetch_add(&r->seq, 1);
    struct target *t = &r->tg.v[k % (uint64_t)r->tg.n];
    c->taddr = t->addr;
    c->taddrlen = t->addrlen;
    c->target = strdup(t->text);
    pthread_mutex_unlock(&r->tlock);
    c->next = w->conns;
    if (w->conns) w->conns->prev = c;
    w->conns = c;
    if (!c->target) {
        conn_fail(c, S2_E_IO);
        return;
    }
    sock_tune(e, fd);
    if (watch(c, &c->a) < 0) {
        conn_fail(c, S2_E_IO);
        return;
    }
    if (r->tls.role == S2_TLS_SERVER) {
        /* The target is dialled only once the peer proved it holds the key. */
        c->a.ssl = tls_new_ssl(&r->tls, fd, NULL);
        if (!c->a.ssl) {
            conn_fail(c, S2_E_TLS_HANDSHAKE);
            return;
        }
        DBG_ADD(e, ssl, 1);
        SSL_set_accept_state(c->a.ssl);
        c->state = ST_HANDSHAKE_A;
        c->deadline = w->now + (int64_t)(e->t.connect_timeout * 1e9);
        conn_set_timer(c, c->deadline);
        if (handshake(c, &c->a) == 1) start_connect(c);
        return;
    }
    start_connect(c);
}

void conn_event(struct side *s, uint32_t events) {
    struct conn *c = s->c;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) s->readable = 1;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) s->writable = 1;
    switch (c->state) {
    case ST_HANDSHAKE_A:
        if (!s->is_target && handshake(c, &c->a) == 1) start_connect(c);
        break;
    case ST_CONNECTING:
        if (s->is_target && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
            int err = 0;
            socklen_t l = sizeof err;
            if (getsockopt(c->b.fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0) err = errno;
            if (err)
                connect_failed(c, err);
            else
                connected(c);
        }
        break;
    case ST_HANDSHAKE_B:
        if (s->is_target && handshake(c, &c->b) == 1) establish(c);
        break;
    case ST_ESTABLISHED:
        if ((events & EPOLLERR) && !(events & EPOLLIN)) {
            /* A reset with nothing left to read: pass it on to the other side. */
            int err = 0;
            socklen_t l = sizeof err;
            if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &l) == 0 && err) {
                route_error(c->r, err == ECONNRESET || err == EPIPE ? S2_E_RESET : S2_E_IO);
                conn_close(c, s->is_target, !s->is_target);
                return;
            }
        }
        conn_pump(c);
        break;
    default:
        break;
    }
}

void conn_timers(struct conn *c) {
    struct worker *w = c->w;
    struct s2_engine *e = w->e;
    if (c->state == ST_DEAD) return;
    if (c->deadline && w->now >= c->deadline) {
        int kind = c->state == ST_CONNECTING ? S2_E_CONNECT_TIMEOUT : S2_E_TLS_HANDSHAKE;
        s2_log_route(c->r, kind, S2_LOG_WARNING, "route %s: %s timed out after %.1f s", c->r->id,
               kind == S2_E_CONNECT_TIMEOUT ? "connecting to the target" : "the TLS handshake",
               e->t.connect_timeout);
        conn_fail(c, kind);
        return;
    }
    if (c->resume || (c->rate_wake && w->now >= c->rate_wake)) {
        c->resume = 0;
        if (c->rate_wake && w->now >= c->rate_wake) c->rate_wake = 0;
        if (c->state == ST_ESTABLISHED) conn_pump(c);
        if (c->state == ST_DEAD) return;
    }
    int64_t idle_ns = (int64_t)(e->t.idle_timeout * 1e9);
    if (idle_ns > 0 && c->state == ST_ESTABLISHED) {
        if (w->now - c->last_active >= idle_ns) {
            s2_log_route(c->r, S2_E_IDLE_TIMEOUT, S2_LOG_INFO,
                         "route %s: connection from %s idle for %.1f s, closed", c->r->id, c->peer,
                         e->t.idle_timeout);
            conn_fail(c, S2_E_IDLE_TIMEOUT);
            return;
        }
        conn_set_timer(c, c->last_active + idle_ns);
    }
    conn_set_timer(c, c->deadline);
    conn_set_timer(c, c->rate_wake);
}
