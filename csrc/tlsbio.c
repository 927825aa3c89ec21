/* The two BIOs between an SSL and its socket (kernel TLS aside): the record
 * reader, which reads ahead for OpenSSL, and the gather BIO, which writes a
 * burst of records with one send(). Both keep errno of a failed socket call
 * (SSL_ERROR_SYSCALL) and set the retry flag on EAGAIN only, as a socket BIO
 * does, so SSL_get_error means the same to the pump. */
#include <errno.h>
#include <openssl/bio.h>
#include <openssl/ssl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "internal.h"

/* The gather BIO's buffer: this many full records per send(). */
#define GATHER_CAP (8 * TLS_RECORD_WIRE)
/* The record reader's buffer: up to this many full records per recv(). */
#define READER_CAP (8 * TLS_RECORD_WIRE)

/* A BIO method of our own, with a fresh type index in *type; NULL when out of memory. */
static BIO_METHOD *method_new(const char *name, int *type, int (*rd)(BIO *, char *, int),
                              int (*wr)(BIO *, const char *, int), long (*ctrl)(BIO *, int, long, void *),
                              int (*destroy)(BIO *)) {
    *type = BIO_get_new_index() | BIO_TYPE_SOURCE_SINK;
    BIO_METHOD *m = BIO_meth_new(*type, name);
    if (m && (!rd || BIO_meth_set_read(m, rd)) && (!wr || BIO_meth_set_write(m, wr)) &&
        BIO_meth_set_ctrl(m, ctrl) && BIO_meth_set_destroy(m, destroy))
        return m;
    BIO_meth_free(m);
    return NULL;
}

/* A BIO of method m holding state (which its destroy frees); NULL, state freed, on failure. */
static BIO *bio_around(BIO_METHOD *m, void *state) {
    BIO *b = state ? BIO_new(m) : NULL;
    if (!b) {
        free(state);
        return NULL;
    }
    BIO_set_data(b, state);
    BIO_set_init(b, 1);
    return b;
}

/* ---- the gather BIO ---------------------------------------------------------
 * OpenSSL hands its write BIO one record at a time. A socket BIO makes that one
 * write() per 16 KiB record, each a trip through the TCP stack. This BIO keeps
 * the records of a burst in a buffer and sends them with one send() when the
 * buffer is full or the pump (or OpenSSL, after a handshake flight or an alert)
 * flushes it.
 * Full socket: a write fails with the retry flag set, so OpenSSL reports
 * SSL_ERROR_WANT_WRITE and the pump waits for EPOLLOUT, as with a socket BIO.
 * A flush from OpenSSL (BIO_flush) sends what it can and succeeds even if the
 * socket is full: during a handshake or a KeyUpdate OpenSSL flushes through
 * its buffering BIO, which does not pass a retry on, so a "retry" there would
 * read as a failure. What is left is sent by tls_flush(), which the pump and
 * the handshake call (and which reports the full socket). Any other send()
 * error fails with errno kept (SSL_ERROR_SYSCALL). */
struct gather {
    int fd;
    unsigned char *buf; /* allocated on first use */
    size_t head, tail;  /* unsent bytes: buf[head, tail) */
};

static BIO_METHOD *gather_method;
static int gather_type;
static pthread_once_t gather_once = PTHREAD_ONCE_INIT;

/* Send what is buffered: 1 = all sent, 0 = the socket is full, -1 = error (errno). */
static int gather_send(struct gather *g) {
    while (g->tail > g->head) {
        ssize_t n = send(g->fd, g->buf + g->head, g->tail - g->head, MSG_NOSIGNAL);
        if (n > 0) {
            g->head += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            return 0;
        } else {
            if (n == 0) errno = EPIPE;
            return -1;
        }
    }
    g->head = g->tail = 0;
    return 1;
}

static int gather_write(BIO *b, const char *data, int len) {
    struct gather *g = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (len <= 0) return 0;
    if (!g->buf && !(g->buf = malloc(GATHER_CAP))) return -1;
    if (g->tail == GATHER_CAP) {
        int r = gather_send(g);
        if (r < 0) return -1;
        if (g->head && g->head == g->tail) g->head = g->tail = 0;
        if (g->head) { /* partly sent: move the rest to the front */
            memmove(g->buf, g->buf + g->head, g->tail - g->head);
            g->tail -= g->head;
            g->head = 0;
        }
        if (g->tail == GATHER_CAP) {
            BIO_set_retry_write(b);
            return -1;
        }
    }
    size_t n = GATHER_CAP - g->tail < (size_t)len ? GATHER_CAP - g->tail : (size_t)len;
    memcpy(g->buf + g->tail, data, n);
    g->tail += n;
    return (int)n; /* OpenSSL writes the rest of a record that did not fit again */
}

static long gather_ctrl(BIO *b, int cmd, long num, void *ptr) {
    (void)num;
    struct gather *g = BIO_get_data(b);
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        BIO_clear_retry_flags(b);
        return gather_send(g) < 0 ? -1 : 1;
    case BIO_CTRL_WPENDING:
    case BIO_CTRL_PENDING:
        return cmd == BIO_CTRL_WPENDING ? (long)(g->tail - g->head) : 0;
    case BIO_C_GET_FD:
        if (ptr) *(int *)ptr = g->fd;
        return g->fd;
    default:
        return 0; /* e.g. BIO_get_ktls_send: no */
    }
}

static int gather_destroy(BIO *b) {
    struct gather *g = BIO_get_data(b);
    if (g) {
        free(g->buf);
        free(g);
    }
    BIO_set_data(b, NULL);
    return 1;
}

static void gather_method_init(void) {
    gather_method =
        method_new("scistream gather", &gather_type, NULL, gather_write, gather_ctrl, gather_destroy);
}

static BIO *gather_new(int fd) {
    pthread_once(&gather_once, gather_method_init);
    if (!gather_method) return NULL;
    struct gather *g = calloc(1, sizeof *g);
    if (g) g->fd = fd;
    return bio_around(gather_method, g);
}

/* ---- the record reader BIO --------------------------------------------------
 * With read-ahead, OpenSSL 3.0 fetches many records with one read(), but before
 * each record it moves everything still buffered to the front of its buffer
 * (ssl3_read_n): 8 records read at once are copied 3.5 times over, the largest
 * user-space cost of a decrypting gateway (16 % of its CPU at 17 Gbit/s). So
 * read-ahead is off and this BIO does it: one recv() of up to READER_CAP bytes
 * into its own buffer, from which OpenSSL takes each record's header and body
 * as it asks for them: one copy per byte, and a record split between two
 * recv()s costs nothing more. It calls recv() only with its buffer empty, so a
 * retry (SSL_ERROR_WANT_READ) still means "the socket said EAGAIN", which is
 * what the pump's edge-triggered epoll needs. EOF is sticky and reported by
 * BIO_eof, which OpenSSL asks to tell a peer's TCP close from a failed read. */
struct reader {
    int fd;
    int eof;
    unsigned char *buf; /* allocated on first read */
    size_t head, tail;  /* unread bytes: buf[head, tail) */
};

static BIO_METHOD *reader_method;
static pthread_once_t reader_once = PTHREAD_ONCE_INIT;

static int reader_read(BIO *b, char *out, int outl) {
    struct reader *r = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (outl <= 0) return 0;
    if (r->head == r->tail) {
        if (r->eof) return 0;
        if (!r->buf && !(r->buf = malloc(READER_CAP))) {
            errno = ENOMEM;
            return -1;
        }
        ssize_t n;
        do {
            n = recv(r->fd, r->buf, READER_CAP, 0);
        } while (n < 0 && errno == EINTR);
        if (n == 0) {
            r->eof = 1;
            return 0;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) BIO_set_retry_read(b);
            return -1;
        }
        r->head = 0;
        r->tail = (size_t)n;
    }
    size_t n = r->tail - r->head < (size_t)outl ? r->tail - r->head : (size_t)outl;
    memcpy(out, r->buf + r->head, n);
    r->head += n;
    return (int)n;
}

static long reader_ctrl(BIO *b, int cmd, long num, void *ptr) {
    (void)num;
    struct reader *r = BIO_get_data(b);
    switch (cmd) {
    case BIO_CTRL_EOF:
        return r->eof && r->head == r->tail;
    case BIO_CTRL_PENDING:
        return (long)(r->tail - r->head);
    case BIO_CTRL_FLUSH:
        return 1;
    case BIO_C_GET_FD:
        if (ptr) *(int *)ptr = r->fd;
        return r->fd;
    default:
        return 0; /* e.g. BIO_get_ktls_recv: no */
    }
}

static int reader_destroy(BIO *b) {
    struct reader *r = BIO_get_data(b);
    if (r) {
        free(r->buf);
        free(r);
    }
    BIO_set_data(b, NULL);
    return 1;
}

static void reader_method_init(void) {
    int type;
    reader_method =
        method_new("scistream record reader", &type, reader_read, NULL, reader_ctrl, reader_destroy);
}

static BIO *reader_new(int fd) {
    pthread_once(&reader_once, reader_method_init);
    if (!reader_method) return NULL;
    struct reader *r = calloc(1, sizeof *r);
    if (r) r->fd = fd;
    return bio_around(reader_method, r);
}

int tls_set_bios(SSL *ssl, int fd) {
    BIO *rbio = reader_new(fd);
    BIO *wbio = gather_new(fd);
    if (!rbio || !wbio) {
        BIO_free(rbio);
        BIO_free(wbio);
        return 0;
    }
    SSL_set_read_ahead(ssl, 0); /* the reader reads ahead */
    SSL_set_bio(ssl, rbio, wbio); /* the SSL owns both now */
    return 1;
}

int tls_established(SSL *ssl) {
    BIO *w = SSL_get_wbio(ssl);
    if (BIO_get_ktls_send(w)) return 1;
    if (BIO_method_type(w) != BIO_TYPE_SOCKET) return 0;
    int fd = -1;
    BIO_get_fd(w, &fd);
    BIO *g = fd >= 0 ? gather_new(fd) : NULL;
    if (g) SSL_set0_wbio(ssl, g); /* else the socket BIO goes on: slower, not wrong */
    return 0;
}

int tls_flush(SSL *ssl) {
    BIO *b = SSL_get_wbio(ssl); /* the gather BIO itself, under OpenSSL's buffering BIO */
    if (!gather_method || BIO_method_type(b) != gather_type) return 1;
    return gather_send(BIO_get_data(b));
}

size_t tls_unsent(SSL *ssl) {
    BIO *b = SSL_get_wbio(ssl);
    if (!gather_method || BIO_method_type(b) != gather_type) return 0;
    const struct gather *g = BIO_get_data(b);
    return g->tail - g->head;
}
