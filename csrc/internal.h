/* Structures shared by the engine's translation units (not part of the API).
 *
 * Calls go one way, down this list, never back up:
 *   engine.c   the public API (engine.h): life cycle, route registry, commands, stats
 *   worker.c   one epoll loop per thread, runs posted commands
 *   conn.c     one connection: accept, connect, handshakes, timers   (pump.c drives its bytes)
 *   route.c    one route: targets, listener, TLS configuration, counters
 *   tls.c, ratelimit.c
 *   log.c      the log ring and per-route log rate limit
 *   util.c     clocks, address text, error messages */
#ifndef SCISTREAM_INTERNAL_H
#define SCISTREAM_INTERNAL_H

#include <netinet/in.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/socket.h>

#include "engine.h"

#define S2_NS 1000000000LL

/* ---- resource counters -------------------------------------------------
 * Open fds, pipes, SSL objects and connection structs, so tests (and operators)
 * can see that all of them come back. Counted in every build: a relaxed atomic
 * add per open/close costs nothing next to the syscalls it accompanies. */
#define DBG_ADD(e, field, n) atomic_fetch_add_explicit(&(e)->dbg_##field, (n), memory_order_relaxed)

/* ---- epoll tags: every epoll data.ptr points at one of these ----------- */
enum tag_kind { TAG_EVENTFD = 1, TAG_LISTENER = 2, TAG_SIDE = 3 };

/* ---- rate limit (ratelimit.c) ------------------------------------------ */
struct bucket {
    uint64_t rate;        /* bytes per second; 0 = unlimited */
    int64_t burst_ns;     /* credit cap, expressed as time */
    _Atomic int64_t tat;  /* GCRA "theoretical arrival time" (ns, monotonic) */
};
void bucket_init(struct bucket *b, uint64_t rate, int64_t now);
/* Grant up to want bytes (0 = out of tokens; *wait_ns says when to retry). */
size_t bucket_take(struct bucket *b, size_t want, int64_t now, int64_t *wait_ns);
void bucket_refund(struct bucket *b, size_t n);

/* ---- AES-GCM for TLS 1.3 legs (aesgcm.c) ---------------------------------- */
struct aesgcm_choice {
    OSSL_LIB_CTX *libctx; /* for SSL_CTX_new_ex: NULL = OpenSSL's default context */
    const char *propq;    /* its property query, or NULL */
    const char *name;     /* what seals the records, for the log ("OpenSSL: <why>" when AUTO fell back) */
};
/* Resolve a tuning's tls_aes_gcm (enum s2_aes_gcm): AUTO takes intel-ipsec-mb where it
 * is built in and the CPU has VAES, else OpenSSL; IPSEC_MB where it cannot be is an error. */
int aesgcm_choose(int choice, struct aesgcm_choice *out, char *err, size_t errlen);

/* ---- TLS configuration (tls.c) ----------------------------------------- */
struct tls_conf {
    int role, mode;
    char *identity;
    unsigned char *key;
    size_t key_len;
    char *server_name;
    int ktls;               /* SSL_OP_ENABLE_KTLS is on (kernel and OpenSSL have it) */
    SSL_CTX *ctx;
};
/* want_ktls: try kernel TLS where available (only when no key update is due, see tls.c). */
/* aes: where a TLS 1.3 context gets its AES-GCM (TLS 1.2 compat contexts keep OpenSSL's). */
int tls_conf_build(struct tls_conf *tc, const s2_route_spec *spec, int want_ktls, const struct aesgcm_choice *aes,
                   char *err, size_t errlen);
/* Whether this kernel and OpenSSL can do kernel TLS (probed once). */
int tls_ktls_available(void);
void tls_conf_clear(struct tls_conf *tc);
/* An SSL on fd: reads through the record reader BIO, writes through the gather BIO
 * (tlsbio.c); with kernel TLS, a socket BIO. */
SSL *tls_new_ssl(struct tls_conf *tc, int fd, const char *target); /* target: the dialled "host:port", or NULL */

/* ---- the SSL's socket BIOs (tlsbio.c) ------------------------------------ */
/* A full TLS 1.3 record on the wire: 5 header + 16384 data + 1 content type + 16 tag. */
#define TLS_RECORD_WIRE (SSL3_RT_HEADER_LENGTH + SSL3_RT_MAX_PLAIN_LENGTH + 1 + 16)
/* Give ssl the record reader and the gather BIO on fd (read-ahead off: the reader
 * reads ahead); 1 = done, 0 = out of memory. */
int tls_set_bios(SSL *ssl, int fd);
/* After the handshake: 1 if the kernel encrypts this SSL's records (kTLS send);
 * else the write side is (now) the gather BIO. */
int tls_established(SSL *ssl);
/* Send the records the gather BIO holds: 1 = none left, 0 = socket full (retry on
 * EPOLLOUT), -1 = failed (errno). */
int tls_flush(SSL *ssl);
/* Bytes of records written by OpenSSL but not yet sent. */
size_t tls_unsent(SSL *ssl);

/* ---- routes ------------------------------------------------------------ */
struct target {
    struct sockaddr_storage addr;
    socklen_t addrlen;      /* 0: did not resolve at add time */
    char *text;             /* "host:port" as given */
};

struct targets {
    struct target *v;
    int n;
};

/* Log lines about single connections, per route and error kind: the first S2_LOG_BURST of an
 * interval of S2_LOG_WINDOW_S are logged one by one, the others only counted and summed up in
 * one line when the interval is over (seen at the next such line or the next drain of the log)
 * or the route is removed. Each of them is in the route's errors all the same. An attacker who
 * fails handshakes by the thousand thus neither floods the log nor pushes other lines out of
 * the ring. scistream/dataplane/loglimit.py does the same for the pure engine. */
#define S2_LOG_BURST 5
#define S2_LOG_WINDOW_S 10
struct loglimit {
    int64_t start;          /* interval start (ns); open while logged > 0 */
    unsigned logged, suppressed;
    int level;              /* highest level among the suppressed */
};

struct route {
    int kind;               /* TAG_LISTENER: epoll tag for the listening socket */
    _Atomic int refs;       /* registry + each connection */
    struct s2_engine *e;
    char *id;
    int listen_fd;
    char bound[80];
    _Atomic int accepting;
    pthread_mutex_t tlock;  /* protects targets (taken once per accept) */
    struct targets tg;
    _Atomic uint64_t seq;   /* connection k goes to targets[k % n] */
    struct tls_conf tls;    /* role S2_TLS_NONE: plain */
    struct bucket bucket;
    int max_conns;
    double started_at;
    _Atomic uint64_t bytes_to, bytes_from, total, key_updates;
    _Atomic int64_t active;
    _Atomic uint64_t errors[S2_E_COUNT];
    struct loglimit loglim[S2_E_COUNT]; /* engine->loglock */
    struct route *next;     /* registry list (engine->rlock) */
};
/* route.c */
/* Validate spec and build an unlisted route holding one reference (the registry's). */
int route_new(struct s2_engine *e, const s2_route_spec *spec, struct route **out, char *err, size_t errlen);
/* Open (or adopt) r's listening socket and note its address in r->bound. */
int route_listen(struct route *r, const s2_route_spec *spec, char *err, size_t errlen);
/* In the registry e->routes (rlock held); NULL if none. */
struct route *route_find(struct s2_engine *e, const char *id);
void route_unref(struct route *r);
void route_error(struct route *r, int kind);
int targets_build(struct targets *tg, const s2_target_spec *spec, int n, char *err, size_t errlen);
void targets_free(struct targets *tg);

/* log.c */
/* A log line about one connection of r that failed with error kind (rate-limited, see above). */
void s2_log_route(struct route *r, int kind, int level, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Sum up r's intervals that are over (all of them when force) in one line each. */
void route_log_flush(struct route *r, int force);

/* ---- connections ------------------------------------------------------- */
struct conn;
struct side {
    int kind;               /* TAG_SIDE */
    int fd;
    SSL *ssl;
    struct conn *c;
    int is_target;
    /* Edge-triggered readiness: set by an epoll event, cleared when a read
     * (write) found the socket empty (full). The pump skips a side whose flag is
     * clear, so an idle direction costs no syscall per round; the next edge sets
     * it again. Cleared only on a sure "nothing there" (EAGAIN / WANT_*), never
     * on a guess, so no byte can wait for an edge that will not come. */
    int readable, writable;
};

struct dir {
    struct side *src, *dst;
    int use_pipe;
    int pipe_r, pipe_w;
    size_t pipe_bytes, pipe_cap;
    unsigned char *buf;
    size_t cap, head, tail;
    int eof;                /* source finished (FIN or close_notify) */
    int shut;               /* destination write side closed (close_notify sent, if TLS) */
    int notified;           /* TLS destination: SSL_shutdown done, close_notify maybe unsent */
    uint64_t bytes;
    uint64_t key_bytes;     /* bytes sent under the current TLS key */
};

enum conn_state { ST_HANDSHAKE_A, ST_CONNECTING, ST_HANDSHAKE_B, ST_ESTABLISHED, ST_DEAD };

struct worker;
struct conn {
    struct worker *w;
    struct route *r;
    uint64_t id;
    int state;
    struct side a, b;       /* a: accepted client, b: target */
    struct dir d[2];        /* d[0]: a -> b (to_target), d[1]: b -> a */
    char peer[80];
    char *target;           /* "host:port" as given */
    struct sockaddr_storage taddr;
    socklen_t taddrlen;
    double started_at;
    int64_t deadline;       /* connect/handshake deadline (ns), 0 = none */
    int64_t rate_wake;      /* when to retry after running out of tokens */
    int64_t last_active;
    int resume;             /* fairness bound hit: pump again from the timer scan */
    struct conn *prev, *next;
};

/* ---- commands ---------------------------------------------------------- */
enum cmd_type { CMD_ADD_LISTENER, CMD_DEL_LISTENER, CMD_CLOSE_ROUTE_CONNS, CMD_SNAPSHOT, CMD_STOP };

struct cmd {
    int type;
    struct route *route;
    pthread_mutex_t m;
    pthread_cond_t cv;
    int pending;            /* workers that still have to run it */
    /* CMD_SNAPSHOT output (appended under m) */
    s2_conn_stats *conns;
    const struct route **conn_routes;
    size_t nconns, capconns;
    int failed;
};

struct cmd_node {
    struct cmd *cmd;
    struct cmd_node *next;
};

struct worker {
    struct s2_engine *e;
    int idx;
    pthread_t th;
    int started;
    int epfd;
    int evfd_kind;          /* TAG_EVENTFD */
    int evfd;
    pthread_mutex_t qlock;
    struct cmd_node *qhead, *qtail;
    struct conn *conns;     /* live connections of this worker */
    struct conn *dead;      /* freed at the end of the event batch */
    int64_t now;
    int64_t next_check;     /* earliest timer to look at (ns), INT64_MAX = none */
    int reserve_fd;         /* released on EMFILE to shed one connection */
    int stop;
};

struct log_entry {
    int level;
    char msg[240];
};
#define S2_LOG_RING 256

struct s2_engine {
    s2_tuning t;
    struct aesgcm_choice aes; /* resolved from t.tls_aes_gcm at start */
    int nworkers;
    struct worker *w;
    pthread_mutex_t rlock;  /* route registry, serialises control commands */
    struct route *routes;
    _Atomic int64_t active; /* connections alive, all routes */
    _Atomic uint64_t next_conn_id;
    _Atomic int congestion_warned;
    pthread_mutex_t loglock;
    struct log_entry logs[S2_LOG_RING];
    unsigned log_head, log_count, log_dropped;
    _Atomic int64_t dbg_fds, dbg_pipes, dbg_ssl, dbg_conns;
    /* Lifetime: the public calls in progress and the close state (engine.c), so that
     * s2_engine_close waits for its callers instead of tearing the engine down under
     * them, and refuses every call after it. */
    pthread_mutex_t ulock;
    pthread_cond_t ucv;
    int users;              /* public calls in progress (ulock) */
    int state;              /* enum engine_state (ulock) */
    _Atomic int closing;    /* set first thing by close: a waiting drain gives up */
};
enum engine_state { ENGINE_OPEN, ENGINE_CLOSING, ENGINE_CLOSED };

/* log.c */
void s2_log(struct s2_engine *e, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Hand the queued lines to sink (the ring only; route summaries are the caller's). */
void log_drain(struct s2_engine *e, s2_log_sink sink, void *ud);

/* util.c */
int64_t mono_ns(void);
double wall_now(void);
void format_sockaddr(const struct sockaddr *sa, char *out, size_t outlen);
/* Write a sentence to err (if any): the message of a failed call. */
void s2_seterr(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* worker.c */
void *worker_main(void *arg);
void worker_wake(struct worker *w);
void worker_post(struct worker *w, struct cmd_node *node);

/* conn.c */
void conn_accept(struct worker *w, struct route *r, int fd);
void conn_event(struct side *s, uint32_t events);
void conn_close(struct conn *c, int reset_a, int reset_b);
void conn_timers(struct conn *c);
void conn_free(struct conn *c);
void conn_set_timer(struct conn *c, int64_t at);
void sock_tune(struct s2_engine *e, int fd);

#endif
