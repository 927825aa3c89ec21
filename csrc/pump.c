/* The byte pumps.
 *
 * plain <-> plain: splice() socket -> pipe -> socket, one pipe per direction,
 * never a byte in userspace. Anything with a TLS leg: one userspace buffer per
 * direction; SSL_read_ex fills it (the record reader BIO reads ahead: one
 * recv() fetches many records), SSL_write_ex drains it in full-size records,
 * which the gather BIO (tlsbio.c) sends with one send() per burst.
 *
 * OpenSSL's error queue: SSL_get_error needs it empty before the call it
 * explains. Clearing it before every SSL call costs more than the call's own
 * bookkeeping at 60,000 records a second, so the engine keeps it empty instead:
 * every path that can leave an error there clears it (tls_fail, the handshake,
 * key_update, SSL_shutdown).
 *
 * Backpressure: a direction reads only while its pipe/buffer has room, so a
 * slow receiver stops the reads and TCP flow control pushes back to the sender;
 * memory per connection is bounded by 2 pipes or 2 buffers.
 * Edge-triggered epoll: each call keeps going until no direction makes
 * progress (or a fairness bound, after which a timer resumes it).
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pump.h"

#define FAIR_ROUNDS 16

struct pr {
    int progress;
    int failed;
    int kind;
    int reset_a, reset_b;
};

static int dir_alloc_buffer(struct s2_engine *e, struct dir *d) {
    d->cap = (size_t)e->t.tls_buffer_size;
    d->buf = malloc(d->cap);
    d->head = d->tail = 0;
    d->use_pipe = 0;
    return d->buf ? 0 : -1;
}

int dir_setup(struct s2_engine *e, struct dir *d, int want_pipe) {
    if (want_pipe) {
        int p[2];
        if (pipe2(p, O_NONBLOCK | O_CLOEXEC) == 0) {
            DBG_ADD(e, fds, 2);
            DBG_ADD(e, pipes, 1);
            d->pipe_r = p[0];
            d->pipe_w = p[1];
            d->use_pipe = 1;
            /* Fails soft above /proc/sys/fs/pipe-max-size for non-root: keep what we got. */
            if (fcntl(p[1], F_SETPIPE_SZ, e->t.pipe_size) < 0) { /* keep the default size */ }
            int sz = fcntl(p[1], F_GETPIPE_SZ);
            d->pipe_cap = sz > 0 ? (size_t)sz : 65536;
            return 0;
        }
    }
    return dir_alloc_buffer(e, d);
}

static void dir_close_pipe(struct s2_engine *e, struct dir *d) {
    if (d->pipe_r >= 0) {
        close(d->pipe_r);
        close(d->pipe_w);
        d->pipe_r = d->pipe_w = -1;
        DBG_ADD(e, fds, -2);
        DBG_ADD(e, pipes, -1);
    }
    d->use_pipe = 0;
}

void dir_release(struct s2_engine *e, struct dir *d) {
    dir_close_pipe(e, d);
    free(d->buf);
    d->buf = NULL;
}

/* Bytes are counted as they are taken from the source (as the pure engine does). */
static void account(struct conn *c, struct dir *d, size_t n) {
    d->bytes += n;
    atomic_fetch_add_explicit(d == &c->d[0] ? &c->r->bytes_to : &c->r->bytes_from, n,
                              memory_order_relaxed);
    c->last_active = c->w->now;
}

static size_t rate_grant(struct conn *c, size_t want) {
    struct route *r = c->r;
    if (!r->bucket.rate) return want;
    if (c->rate_wake) return 0; /* a timer resumes reading */
    int64_t wait = 0;
    size_t g = bucket_take(&r->bucket, want, c->w->now, &wait);
    if (!g) {
        c->rate_wake = c->w->now + wait;
        conn_set_timer(c, c->rate_wake);
    }
    return g;
}

static void rate_return(struct conn *c, size_t granted, size_t used) {
    if (c->r->bucket.rate && used < granted) bucket_refund(&c->r->bucket, granted - used);
}

static int is_reset(int err) { return err == ECONNRESET || err == EPIPE; }

/* Reading the source failed: a reset there is passed on to the destination. */
static void read_fail(struct conn *c, struct dir *d, int err, struct pr *p) {
    p->failed = 1;
    p->kind = is_reset(err) ? S2_E_RESET : S2_E_IO;
    if (p->kind == S2_E_RESET) {
        if (d->dst == &c->a) p->reset_a = 1; else p->reset_b = 1;
    } else {
        s2_log_route(c->r, S2_E_IO, S2_LOG_WARNING, "route %s: read error: %s", c->r->id, strerror(err));
    }
}

/* Writing the destination failed: its reset is passed on to the source. */
static void write_fail(struct conn *c, struct dir *d, int err, struct pr *p) {
    p->failed = 1;
    p->kind = is_reset(err) ? S2_E_RESET : S2_E_IO;
    if (p->kind == S2_E_RESET) {
        if (d->src == &c->a) p->reset_a = 1; else p->reset_b = 1;
    } else {
        s2_log_route(c->r, S2_E_IO, S2_LOG_WARNING, "route %s: write error: %s", c->r->id, strerror(err));
    }
}

static void tls_fail(struct conn *c, struct pr *p, const char *what) {
    char why[160] = "unknown";
    unsigned long e = ERR_peek_error();
    if (e) ERR_error_string_n(e, why, sizeof why);
    ERR_clear_error();
    s2_log_route(c->r, S2_E_IO, S2_LOG_WARNING, "route %s: TLS %s failed: %s", c->r->id, what, why);
    p->failed = 1;
    p->kind = S2_E_IO;
}

/* An SSL call that writes failed, not for a retry. Once the peer's close_notify is in,
 * SSL_get_error calls a failed send "zero return" too: a socket error (errno, nothing in
 * OpenSSL's queue) is passed on as such all the same, a reset as a reset. */
static void ssl_write_fail(struct conn *c, struct dir *d, int err, struct pr *p, const char *what) {
    int sys = errno;
    if ((err == SSL_ERROR_SYSCALL || err == SSL_ERROR_ZERO_RETURN) && sys) {
        ERR_clear_error();
        write_fail(c, d, sys, p);
    } else {
        tls_fail(c, p, what);
    }
}

static void shut_plain(struct dir *d, struct pr *p) {
    if (shutdown(d->dst->fd, SHUT_WR) < 0) { /* ENOTCONN: the peer is gone already */ }
    d->shut = 1;
    p->progress = 1;
}

static void step_pipe(struct conn *c, struct dir *d, struct pr *p) {
    /* Bounded in bytes, not only by the pipe's slots: a slot can hold a whole
     * socket fragment, so the kernel alone would let a pipe hold several MiB. */
    if (!d->eof && d->src->readable && d->pipe_bytes < d->pipe_cap) {
        size_t g = rate_grant(c, d->pipe_cap - d->pipe_bytes);
        if (g) {
            ssize_t n = splice(d->src->fd, NULL, d->pipe_w, NULL, g, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            int err = errno;
            rate_return(c, g, n > 0 ? (size_t)n : 0);
            if (n > 0) {
                d->pipe_bytes += (size_t)n;
                account(c, d, (size_t)n);
                p->progress = 1;
            } else if (n == 0) {
                d->eof = 1;
                p->progress = 1;
            } else if (err == EINVAL && d->pipe_bytes == 0) {
                /* This socket type cannot splice: copy through userspace instead. */
                dir_close_pipe(c->w->e, d);
                if (dir_alloc_buffer(c->w->e, d) < 0) {
                    p->failed = 1;
                    p->kind = S2_E_IO;
                }
                p->progress = 1;
                return;
            } else if (err == EAGAIN) {
                /* "Socket empty" or "pipe out of slots". Only with an empty pipe
                 * is it surely the socket; otherwise the write below frees slots
                 * and the next round reads again. */
                if (d->pipe_bytes == 0) d->src->readable = 0;
            } else if (err != EINTR) {
                read_fail(c, d, err, p);
                return;
            }
        }
    }
    if (d->pipe_bytes && d->dst->writable) {
        ssize_t n = splice(d->pipe_r, NULL, d->dst->fd, NULL, d->pipe_bytes,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n > 0) {
            d->pipe_bytes -= (size_t)n;
            p->progress = 1;
        } else if (n < 0 && errno == EAGAIN) {
            d->dst->writable = 0;
        } else if (n < 0 && errno != EINTR) {
            write_fail(c, d, errno, p);
            return;
        }
    }
    if (d->eof && !d->pipe_bytes && !d->shut) shut_plain(d, p);
}

static void read_buf(struct conn *c, struct dir *d, struct pr *p) {
    if (d->head == d->tail) {
        d->head = d->tail = 0;
    } else if (d->tail == d->cap && d->tail - d->head <= d->cap / 8) {
        /* Only a small tail is worth moving (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
         * lets a pending write move); otherwise wait until the writes drain it. */
        memmove(d->buf, d->buf + d->head, d->tail - d->head);
        d->tail -= d->head;
        d->head = 0;
    }
    if (d->eof || d->tail == d->cap || !d->src->readable) return;
    size_t g = rate_grant(c, d->cap - d->tail);
    if (!g) return;
    size_t got = 0;
    SSL *ssl = d->src->ssl;
    if (ssl) {
        while (got < g) {
            size_t n = 0;
            if (SSL_read_ex(ssl, d->buf + d->tail + got, g - got, &n)) {
                got += n;
                continue;
            }
            int err = SSL_get_error(ssl, 0);
            if (err == SSL_ERROR_WANT_READ) {
                /* OpenSSL has no whole record left and the socket is empty. */
                d->src->readable = 0;
                break;
            }
            if (err == SSL_ERROR_WANT_WRITE) break; /* a post-handshake reply waits for room */
            if (err == SSL_ERROR_ZERO_RETURN) {
                d->eof = 1;
                p->progress = 1;
            } else if (err == SSL_ERROR_SYSCALL) {
                ERR_clear_error();
                if (errno == 0) { /* EOF without close_notify */
                    d->eof = 1;
                    p->progress = 1;
                } else {
                    read_fail(c, d, errno, p);
                }
            } else {
                tls_fail(c, p, "read");
            }
            break;
        }
    } else {
        ssize_t n = recv(d->src->fd, d->buf + d->tail, g, 0);
        if (n > 0) {
            got = (size_t)n;
        } else if (n == 0) {
            d->eof = 1;
            p->progress = 1;
        } else if (errno == EAGAIN) {
            d->src->readable = 0;
        } else if (errno != EINTR) {
            read_fail(c, d, errno, p);
        }
    }
    /* A reply OpenSSL wrote while reading (e.g. a requested KeyUpdate) leaves now;
     * a socket error shows on the other direction's next write. */
    if (ssl && tls_unsent(ssl) && d->src->writable && tls_flush(ssl) == 0) d->src->writable = 0;
    rate_return(c, g, got);
    if (got) {
        account(c, d, got);
        d->tail += got;
        p->progress = 1;
    }
}

static void key_update(struct conn *c, struct dir *d, SSL *ssl, size_t n) {
    uint64_t limit = c->w->e->t.tls_key_update_bytes;
    d->key_bytes += n;
    if (!limit || d->key_bytes < limit || SSL_version(ssl) != TLS1_3_VERSION) return;
    d->key_bytes = 0;
    /* Rotate our sending key only. Requesting the peer's update would make its
     * OpenSSL 3.0 answer from inside SSL_read, which fails ("bad length") when
     * it has an application write pending; each engine rotates its own key. */
    if (SSL_key_update(ssl, SSL_KEY_UPDATE_NOT_REQUESTED))
        atomic_fetch_add_explicit(&c->r->key_updates, 1, memory_order_relaxed);
    else
        ERR_clear_error();
}

/* Push out what the gather BIO holds; 0 = done, -1 = stop here (socket full or failed). */
static int flush_tls(struct conn *c, struct dir *d, SSL *ssl, struct pr *p) {
    int r = tls_flush(ssl);
    if (r > 0) return 0;
    if (r == 0)
        d->dst->writable = 0; /* EPOLLOUT brings us back */
    else
        write_fail(c, d, errno, p);
    return -1;
}

static void write_records(struct conn *c, struct dir *d, struct pr *p) {
    SSL *ssl = d->dst->ssl;
    while (d->tail > d->head) {
        size_t len = d->tail - d->head;
        if (ssl) {
            size_t n = 0;
            if (SSL_write_ex(ssl, d->buf + d->head, len, &n)) {
                d->head += n;
                p->progress = 1;
                key_update(c, d, ssl, n);
                continue;
            }
            int err = SSL_get_error(ssl, 0);
            if (err == SSL_ERROR_WANT_WRITE) d->dst->writable = 0;
            if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) return;
            ssl_write_fail(c, d, err, p, "write");
            return;
        }
        ssize_t n = send(d->dst->fd, d->buf + d->head, len, MSG_NOSIGNAL);
        if (n > 0) {
            d->head += (size_t)n;
            p->progress = 1;
            if ((size_t)n < len) return; /* socket buffer full: wait for EPOLLOUT */
        } else {
            if (n < 0 && errno == EAGAIN)
                d->dst->writable = 0;
            else if (n < 0 && errno != EINTR)
                write_fail(c, d, errno, p);
            return;
        }
    }
    /* The burst's records are written: send them (one send() for up to 8 records). */
    if (ssl && flush_tls(c, d, ssl, p) < 0) return;
    if (d->eof && !d->shut) {
        if (!ssl) {
            shut_plain(d, p);
            return;
        }
        if (!d->notified) {
            /* A key update due after the last write leaves the SSL "in init" until its
             * KeyUpdate is sent (by the next SSL_write or SSL_read, of which there may be
             * none now), and SSL_shutdown refuses to run then: send the KeyUpdate first.
             * Taking that refusal for a sent close_notify lost this direction's EOF. */
            if (SSL_in_init(ssl)) {
                int r = SSL_do_handshake(ssl);
                if (r != 1) {
                    int err = SSL_get_error(ssl, r);
                    if (err == SSL_ERROR_WANT_WRITE) { /* the socket is full: EPOLLOUT brings us back */
                        d->dst->writable = 0;
                        return;
                    }
                    ssl_write_fail(c, d, err, p, "key update");
                    return;
                }
            }
            int r = SSL_shutdown(ssl); /* sends close_notify; the peer's comes as EOF on read */
            if (r < 0) {
                int err = SSL_get_error(ssl, r);
                if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) {
                    ERR_clear_error();
                    return;
                }
                /* No close_notify went out: fail loudly rather than mark the direction
                 * shut with no EOF sent, which leaves the peer waiting for ever. */
                ssl_write_fail(c, d, err, p, "shutdown");
                return;
            }
            d->notified = 1;
        }
        /* SSL_shutdown ignores a failed flush of the alert: the direction is shut
         * only once the close_notify has left (or the socket failed). */
        if (flush_tls(c, d, ssl, p) < 0) return;
        d->shut = 1;
        p->progress = 1;
    }
}

static void write_buf(struct conn *c, struct dir *d, struct pr *p) {
    int pending = d->tail > d->head || (d->dst->ssl && tls_unsent(d->dst->ssl));
    if (pending && !d->dst->writable) return; /* EPOLLOUT brings us back */
    write_records(c, d, p);
}

static void step_buf(struct conn *c, struct dir *d, struct pr *p) {
    read_buf(c, d, p);
    if (!p->failed) write_buf(c, d, p);
}

void conn_pump(struct conn *c) {
    for (int rounds = 0;; rounds++) {
        struct pr p = {0};
        for (int i = 0; i < 2 && !p.failed; i++) {
            struct dir *d = &c->d[i];
            if (d->shut) continue;
            if (d->use_pipe)
                step_pipe(c, d, &p);
            else
                step_buf(c, d, &p);
        }
        if (p.failed) {
            route_error(c->r, p.kind);
            conn_close(c, p.reset_a, p.reset_b);
            return;
        }
        if (c->d[0].shut && c->d[1].shut) {
            conn_close(c, 0, 0);
            return;
        }
        if (!p.progress) return;
        if (rounds == FAIR_ROUNDS) {
            /* Let the worker's other connections run; a timer brings us back. */
            c->resume = 1;
            conn_set_timer(c, c->w->now);
            return;
        }
    }
}
