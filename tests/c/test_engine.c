/* C unit tests of the data-plane engine, run under ASan+UBSan by
 * tests/c/test_sanitizers.py (built by tests/c/Makefile with SCISTREAM_DEBUG=1,
 * so every test also checks that fds, pipes, SSL objects and connections all
 * return to zero). Loopback only; ports from the kernel. Exit 0 = all passed. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/provider.h>
#include <openssl/rand.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"
#include "internal.h" /* aesgcm_choose: the AES-GCM provider is tested on its own */

static int failures;

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                     \
            fprintf(stderr, "\n");                                            \
            failures++;                                                       \
        }                                                                     \
    } while (0)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void print_log(void *ud, int level, const char *msg) {
    (void)ud;
    if (level >= S2_LOG_WARNING) fprintf(stderr, "  engine log %d: %s\n", level, msg);
}

/* ---- sockets -------------------------------------------------------------- */

static int listen_any(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 64) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &l) < 0) {
        perror("listen_any");
        exit(2);
    }
    *port = ntohs(a.sin_port);
    return fd;
}

static int free_port(void) {
    int port, fd = listen_any(&port);
    close(fd);
    return port;
}

static int port_of(const char *bound) {
    const char *c = strrchr(bound, ':');
    return c ? atoi(c + 1) : -1;
}

static int dial(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    struct timeval tv = {20, 0}; /* no test hangs forever */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

static int write_all(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Deterministic stream: byte i of stream `seed`. */
static void pattern(unsigned char *buf, size_t off, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) {
        uint64_t x = (off + i) * 0x9E3779B97F4A7C15ULL + seed;
        buf[i] = (unsigned char)(x >> 56);
    }
}

/* ---- peers (servers in threads) ------------------------------------------- */

enum mode { ECHO, IDENT, LATE_REPLY, SINK };

struct server {
    int fd, port;
    enum mode mode;
    int ident;
    pthread_t th;
    atomic_int stop;
    atomic_int accepted;
    atomic_llong sunk;
};

static void serve_one(struct server *s, int c) {
    struct timeval tv = {20, 0};
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    unsigned char *buf = malloc(1 << 16);
    if (!buf) exit(2);
    ssize_t n;
    switch (s->mode) {
    case ECHO:
        while ((n = recv(c, buf, 1 << 16, 0)) > 0)
            if (write_all(c, buf, (size_t)n) < 0) break;
        shutdown(c, SHUT_WR);
        break;
    case IDENT:
        buf[0] = (unsigned char)s->ident;
        write_all(c, buf, 1);
        break;
    case LATE_REPLY: /* answer only after the client's FIN arrived: half-close works */
        while ((n = recv(c, buf, 1 << 16, 0)) > 0) {
        }
        for (size_t off = 0; off < (1u << 20); off += 1 << 16) {
            pattern(buf, off, 1 << 16, 7);
            if (write_all(c, buf, 1 << 16) < 0) break;
        }
        break;
    case SINK:
        while ((n = recv(c, buf, 1 << 16, 0)) > 0) atomic_fetch_add(&s->sunk, n);
        break;
    }
    free(buf);
    close(c);
}

static void *server_main(void *arg) {
    struct server *s = arg;
    while (!atomic_load(&s->stop)) {
        struct pollfd p = {.fd = s->fd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0) continue;
        int c = accept(s->fd, NULL, NULL);
        if (c < 0) continue;
        atomic_fetch_add(&s->accepted, 1);
        serve_one(s, c);
    }
    return NULL;
}

static void server_start(struct server *s, enum mode m, int ident) {
    memset(s, 0, sizeof *s);
    s->mode = m;
    s->ident = ident;
    s->fd = listen_any(&s->port);
    if (pthread_create(&s->th, NULL, server_main, s) != 0) exit(2);
}

static void server_stop(struct server *s) {
    atomic_store(&s->stop, 1);
    pthread_join(s->th, NULL);
    close(s->fd);
}

/* ---- client: send a pattern stream, read back, compare SHA-256 ------------ */

struct sender {
    int fd;
    size_t n;
    int rc;
};

static void *sender_main(void *arg) {
    struct sender *s = arg;
    unsigned char *buf = malloc(1 << 16);
    s->rc = buf ? 0 : -1;
    for (size_t off = 0; buf && off < s->n; off += 1 << 16) {
        size_t k = s->n - off < (1u << 16) ? s->n - off : 1u << 16;
        pattern(buf, off, k, 1);
        if (write_all(s->fd, buf, k) < 0) {
            s->rc = -1;
            break;
        }
    }
    shutdown(s->fd, SHUT_WR);
    free(buf);
    return NULL;
}

static void digest_pattern(size_t n, unsigned seed, unsigned char out[32]) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned char *buf = malloc(1 << 16);
    EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    for (size_t off = 0; off < n; off += 1 << 16) {
        size_t k = n - off < (1u << 16) ? n - off : 1u << 16;
        pattern(buf, off, k, seed);
        EVP_DigestUpdate(ctx, buf, k);
    }
    EVP_DigestFinal_ex(ctx, out, NULL);
    EVP_MD_CTX_free(ctx);
    free(buf);
}

/* Read to EOF; returns bytes read (or -1 on error/reset) and the digest. */
static long long read_all(int fd, unsigned char out[32]) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned char *buf = malloc(1 << 16);
    long long total = 0;
    EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    for (;;) {
        ssize_t n = recv(fd, buf, 1 << 16, 0);
        if (n == 0) break;
        if (n < 0) {
            if (errno == EINTR) continue;
            total = -1;
            break;
        }
        EVP_DigestUpdate(ctx, buf, (size_t)n);
        total += n;
    }
    EVP_DigestFinal_ex(ctx, out, NULL);
    EVP_MD_CTX_free(ctx);
    free(buf);
    return total;
}

/* Echo round trip of n bytes through port; 1 when every byte came back intact. */
static int roundtrip(int port, size_t n) {
    int fd = dial(port);
    if (fd < 0) return 0;
    struct sender s = {.fd = fd, .n = n};
    pthread_t th;
    if (pthread_create(&th, NULL, sender_main, &s) != 0) exit(2);
    unsigned char got[32], want[32];
    long long r = read_all(fd, got);
    pthread_join(th, NULL);
    close(fd);
    digest_pattern(n, 1, want);
    return s.rc == 0 && r == (long long)n && memcmp(got, want, 32) == 0;
}

/* ---- engine helpers -------------------------------------------------------- */

static s2_engine *engine_new(int workers) {
    s2_tuning t;
    s2_tuning_defaults(&t);
    t.workers = workers;
    t.connect_timeout = 3.0;
    t.pipe_size = 256 * 1024;
    t.tls_buffer_size = 64 * 1024;
    char err[256] = "";
    s2_engine *e = NULL;
    int rc = s2_engine_new(&t, &e, err, sizeof err);
    if (rc != S2_OK) {
        fprintf(stderr, "engine_new: %s\n", err);
        exit(2);
    }
    return e;
}

/* A route on 127.0.0.1 (ephemeral port) to one target on 127.0.0.1; the caller adds keys. */
static s2_route_spec loopback_spec(const char *id, const s2_target_spec *t, int role, int mode) {
    s2_route_spec r = {0};
    r.route_id = id;
    r.listen_host = "127.0.0.1";
    r.listen_fd = -1;
    r.targets = t;
    r.ntargets = 1;
    r.tls_role = role;
    r.tls_mode = mode;
    return r;
}

/* s2_route_add, saying why on failure; *bound_port: the port it listens on, or -1. */
static int submit_route(s2_engine *e, const s2_route_spec *r, int *bound_port) {
    char bound[80] = "", err[256] = "";
    int rc = s2_route_add(e, r, bound, sizeof bound, err, sizeof err);
    if (rc != S2_OK) fprintf(stderr, "  route %s: %s\n", r->route_id, err);
    if (bound_port) *bound_port = rc == S2_OK ? port_of(bound) : -1;
    return rc;
}

static int add_route(s2_engine *e, const char *id, int target_port, int role, int mode, const char *ident,
                     const char *key, uint64_t rate, int *bound_port) {
    s2_target_spec t = {"127.0.0.1", target_port};
    s2_route_spec r = loopback_spec(id, &t, role, mode);
    r.psk_identity = ident;
    r.psk_key = (const unsigned char *)key;
    r.psk_key_len = key ? strlen(key) : 0;
    r.rate_limit = rate;
    return submit_route(e, &r, bound_port);
}

static s2_route_stats route_stats(s2_engine *e, const char *id) {
    s2_stats *s = NULL;
    char err[256];
    s2_route_stats out;
    memset(&out, 0, sizeof out);
    if (s2_engine_stats(e, id, 0, &s, err, sizeof err) == S2_OK && s->nroutes == 1) {
        out = s->routes[0];
        out.route_id = NULL;
        out.targets = NULL;
        out.ntargets = 0;
        out.conns = NULL;
        out.nconns = 0;
    }
    s2_stats_free(s);
    return out;
}

/* Wait until no connection is left, then check every resource is back to zero. */
static void engine_done(s2_engine *e, const char *test) {
    s2_resources res;
    double end = now_s() + 10;
    do {
        s2_engine_resources(e, &res);
        if (!res.fds && !res.pipes && !res.ssl_objects && !res.connections) break;
        sleep_ms(10);
    } while (now_s() < end);
    CHECK(!res.fds && !res.pipes && !res.ssl_objects && !res.connections,
          "%s: resources left: fds=%lld pipes=%lld ssl=%lld conns=%lld", test, (long long)res.fds,
          (long long)res.pipes, (long long)res.ssl_objects, (long long)res.connections);
    s2_engine_drain_logs(e, print_log, NULL);
    s2_engine_free(e);
}

/* ---- tests ----------------------------------------------------------------- */

static void test_plain_forward(void) {
    struct server srv;
    server_start(&srv, ECHO, 0);
    s2_engine *e = engine_new(2);
    int port;
    CHECK(add_route(e, "plain", srv.port, S2_TLS_NONE, 0, NULL, NULL, 0, &port) == S2_OK, "add");
    size_t n = 6u << 20;
    CHECK(roundtrip(port, n), "plain echo of %zu bytes", n);
    CHECK(roundtrip(port, 1), "plain echo of 1 byte");
    s2_route_stats rs = route_stats(e, "plain");
    CHECK(rs.bytes_to_target == n + 1 && rs.bytes_from_target == n + 1, "bytes %llu/%llu",
          (unsigned long long)rs.bytes_to_target, (unsigned long long)rs.bytes_from_target);
    CHECK(rs.connections_total == 2, "total %llu", (unsigned long long)rs.connections_total);
    engine_done(e, "plain_forward");
    server_stop(&srv);
}

static void test_half_close(void) {
    struct server srv;
    server_start(&srv, LATE_REPLY, 0);
    s2_engine *e = engine_new(1);
    int port;
    CHECK(add_route(e, "hc", srv.port, S2_TLS_NONE, 0, NULL, NULL, 0, &port) == S2_OK, "add");
    int fd = dial(port);
    CHECK(fd >= 0, "dial");
    CHECK(write_all(fd, (const unsigned char *)"hello", 5) == 0, "send");
    shutdown(fd, SHUT_WR); /* the reply comes only after the server saw our FIN */
    unsigned char got[32], want[32];
    long long r = read_all(fd, got);
    digest_pattern(1u << 20, 7, want);
    CHECK(r == (1 << 20) && !memcmp(got, want, 32), "half-close reply: %lld bytes", r);
    close(fd);
    engine_done(e, "half_close");
    server_stop(&srv);
}

static void test_refused_target(void) {
    s2_engine *e = engine_new(1);
    int port;
    CHECK(add_route(e, "ref", free_port(), S2_TLS_NONE, 0, NULL, NULL, 0, &port) == S2_OK, "add");
    int fd = dial(port);
    CHECK(fd >= 0, "dial");
    unsigned char d[32];
    long long r = read_all(fd, d);
    CHECK(r <= 0, "refused target: the client gets EOF or reset, got %lld bytes", r);
    close(fd);
    s2_route_stats rs = route_stats(e, "ref");
    CHECK(rs.errors[S2_E_CONNECT_REFUSED] == 1, "connect_refused=%llu",
          (unsigned long long)rs.errors[S2_E_CONNECT_REFUSED]);
    engine_done(e, "refused_target");
}

static int read_ident(int port) {
    int fd = dial(port);
    if (fd < 0) return -1;
    unsigned char b = 0;
    ssize_t n = recv(fd, &b, 1, 0);
    close(fd);
    return n == 1 ? b : -1;
}

static void test_routes(void) {
    struct server a, b;
    server_start(&a, IDENT, 'A');
    server_start(&b, IDENT, 'B');
    s2_engine *e = engine_new(2);
    int port;
    char err[256];
    CHECK(add_route(e, "r", a.port, S2_TLS_NONE, 0, NULL, NULL, 0, &port) == S2_OK, "add");
    CHECK(add_route(e, "r", a.port, S2_TLS_NONE, 0, NULL, NULL, 0, NULL) == S2_ERR_EXISTS, "duplicate id");
    /* The same address twice: the second route cannot bind. */
    s2_target_spec t = {"127.0.0.1", a.port};
    s2_route_spec r2 = {.route_id = "r2", .listen_host = "127.0.0.1", .listen_port = port,
                        .listen_fd = -1, .targets = &t, .ntargets = 1};
    CHECK(s2_route_add(e, &r2, NULL, 0, err, sizeof err) == S2_ERR_ADDR_IN_USE, "address in use");
    CHECK(read_ident(port) == 'A', "first target");
    s2_target_spec nt = {"127.0.0.1", b.port};
    CHECK(s2_route_retarget(e, "r", &nt, 1, err, sizeof err) == S2_OK, "retarget: %s", err);
    CHECK(read_ident(port) == 'B', "retargeted");
    CHECK(s2_route_retarget(e, "nope", &nt, 1, err, sizeof err) == S2_ERR_NOT_FOUND, "retarget unknown");
    /* Two targets: connections alternate. */
    s2_target_spec two[2] = {{"127.0.0.1", a.port}, {"127.0.0.1", b.port}};
    CHECK(s2_route_retarget(e, "r", two, 2, err, sizeof err) == S2_OK, "retarget two");
    int x = read_ident(port), y = read_ident(port);
    CHECK(x != y && (x == 'A' || x == 'B') && (y == 'A' || y == 'B'), "round robin %c %c", x, y);
    CHECK(s2_route_remove(e, "r", 0, err, sizeof err) == S2_OK, "remove");
    CHECK(s2_route_remove(e, "r", 0, err, sizeof err) == S2_ERR_NOT_FOUND, "remove twice");
    CHECK(dial(port) < 0, "listener closed after remove");
    s2_stats *s = NULL;
    CHECK(s2_engine_stats(e, "r", 0, &s, err, sizeof err) == S2_ERR_NOT_FOUND, "stats of removed route");
    s2_stats_free(s);
    engine_done(e, "routes");
    server_stop(&a);
    server_stop(&b);
}

static void test_remove_while_streaming(void) {
    struct server srv;
    server_start(&srv, ECHO, 0);
    s2_engine *e = engine_new(2);
    int port;
    char err[256];
    CHECK(add_route(e, "rs", srv.port, S2_TLS_NONE, 0, NULL, NULL, 0, &port) == S2_OK, "add");
    int fd = dial(port);
    unsigned char buf[1000];
    memset(buf, 'x', sizeof buf);
    CHECK(write_all(fd, buf, sizeof buf) == 0, "send");
    CHECK(recv(fd, buf, sizeof buf, MSG_WAITALL) == (ssize_t)sizeof buf, "echo before remove");
    CHECK(s2_route_remove(e, "rs", 0, err, sizeof err) == S2_OK, "remove without drain");
    unsigned char d[32];
    CHECK(read_all(fd, d) <= 0, "connection closed by remove");
    close(fd);
    engine_done(e, "remove_while_streaming");
    server_stop(&srv);
}

static void test_tls_psk_pair(int mode) {
    struct server srv;
    server_start(&srv, ECHO, 0);
    s2_engine *e = engine_new(2);
    int sport, cport;
    const char *key = "0123456789abcdef0123456789abcdef";
    const char *ident = mode == S2_TLS_COMPAT ? "client1" : "session-1";
    CHECK(add_route(e, "srv", srv.port, S2_TLS_SERVER, mode, ident, key, 0, &sport) == S2_OK, "add srv");
    CHECK(add_route(e, "cli", sport, S2_TLS_CLIENT, mode, ident, key, 0, &cport) == S2_OK, "add cli");
    size_t n = 3u << 20;
    CHECK(roundtrip(cport, n), "TLS %s pair echo of %zu bytes", mode == S2_TLS_COMPAT ? "compat" : "psk", n);
    CHECK(roundtrip(cport, 0), "TLS empty stream");
    s2_route_stats rs = route_stats(e, "srv");
    CHECK(rs.bytes_to_target == n && rs.errors[S2_E_TLS_HANDSHAKE] == 0, "srv bytes %llu",
          (unsigned long long)rs.bytes_to_target);
    engine_done(e, "tls_psk_pair");
    server_stop(&srv);
}

/* A key update due after every record (threshold 1 byte): one is pending when each
 * direction's EOF comes, and the close_notify must still reach the peer, after the
 * KeyUpdate. The client half-closes once both engines are idle, so no read on the TLS
 * leg sends the KeyUpdate first; LATE_REPLY answers only after it saw that EOF. */
static void test_tls_key_update_half_close(void) {
    struct server srv;
    server_start(&srv, LATE_REPLY, 0);
    s2_tuning t;
    s2_tuning_defaults(&t);
    t.workers = 1;
    t.connect_timeout = 3.0;
    t.tls_buffer_size = 64 * 1024;
    t.tls_key_update_bytes = 1;
    char err[256] = "";
    s2_engine *e = NULL;
    if (s2_engine_new(&t, &e, err, sizeof err) != S2_OK) {
        fprintf(stderr, "engine_new: %s\n", err);
        exit(2);
    }
    int sport, cport;
    const char *key = "0123456789abcdef0123456789abcdef";
    CHECK(add_route(e, "srv", srv.port, S2_TLS_SERVER, S2_TLS_PSK, "ku", key, 0, &sport) == S2_OK, "add srv");
    CHECK(add_route(e, "cli", sport, S2_TLS_CLIENT, S2_TLS_PSK, "ku", key, 0, &cport) == S2_OK, "add cli");
    int fd = dial(cport);
    CHECK(fd >= 0, "dial");
    size_t n = 100000; /* more than one buffer: the last records go out after the first read */
    unsigned char *buf = malloc(n);
    if (!buf) exit(2);
    pattern(buf, 0, n, 3);
    CHECK(write_all(fd, buf, n) == 0, "send");
    free(buf);
    sleep_ms(200);
    shutdown(fd, SHUT_WR);
    unsigned char got[32], want[32];
    long long r = read_all(fd, got);
    digest_pattern(1u << 20, 7, want);
    CHECK(r == (1 << 20) && !memcmp(got, want, 32), "reply after the half-close: %lld bytes", r);
    close(fd);
    s2_route_stats rs = route_stats(e, "srv");
    CHECK(rs.bytes_to_target == n && rs.tls_key_updates > 0 && rs.errors[S2_E_IO] == 0,
          "srv bytes %llu, key updates %llu", (unsigned long long)rs.bytes_to_target,
          (unsigned long long)rs.tls_key_updates);
    engine_done(e, "tls_key_update_half_close");
    server_stop(&srv);
}

static void test_tls_wrong_key(void) {
    struct server srv;
    server_start(&srv, ECHO, 0);
    s2_engine *e = engine_new(2);
    int sport, cport, cport2;
    CHECK(add_route(e, "srv", srv.port, S2_TLS_SERVER, S2_TLS_PSK, "id", "right-key-right-key", 0, &sport) ==
              S2_OK, "add srv");
    CHECK(add_route(e, "bad", sport, S2_TLS_CLIENT, S2_TLS_PSK, "id", "wrong-key-wrong-key", 0, &cport) ==
              S2_OK, "add bad");
    CHECK(add_route(e, "bad-id", sport, S2_TLS_CLIENT, S2_TLS_PSK, "other", "right-key-right-key", 0,
                    &cport2) == S2_OK, "add bad id");
    CHECK(!roundtrip(cport, 1000), "wrong key must not get through");
    CHECK(!roundtrip(cport2, 1000), "unknown identity must not get through");
    double end = now_s() + 5;
    while (route_stats(e, "srv").errors[S2_E_TLS_HANDSHAKE] < 2 && now_s() < end) sleep_ms(10);
    s2_route_stats rs = route_stats(e, "srv");
    CHECK(rs.errors[S2_E_TLS_HANDSHAKE] == 2, "server tls_handshake errors %llu",
          (unsigned long long)rs.errors[S2_E_TLS_HANDSHAKE]);
    CHECK(rs.bytes_to_target == 0 && atomic_load(&srv.accepted) == 0, "nothing reached the target");
    engine_done(e, "tls_wrong_key");
    server_stop(&srv);
}

/* Certificate mode with client certificates: the server's CA file requires one from
 * that CA; a client with a certificate presents it. The files come from the runner
 * (S2_TEST_CERT_DIR: gateway-ca.crt, prod.*, cons.*, and rogue.* of another CA). */
static int add_cert_route(s2_engine *e, const char *id, int target_port, int role, const char *dir,
                          const char *who, int *bound_port) {
    char cert[512], key[512], ca[512];
    snprintf(cert, sizeof cert, "%s/%s.crt", dir, who);
    snprintf(key, sizeof key, "%s/%s.key", dir, who);
    snprintf(ca, sizeof ca, "%s/gateway-ca.crt", dir);
    s2_target_spec t = {"127.0.0.1", target_port};
    s2_route_spec r = loopback_spec(id, &t, role, S2_TLS_CERT);
    r.cert_file = *who ? cert : NULL;
    r.key_file = *who ? key : NULL;
    r.ca_file = ca;
    return submit_route(e, &r, bound_port);
}

static void test_tls_mutual_cert(const char *dir) {
    struct server srv;
    server_start(&srv, ECHO, 0);
    s2_engine *e = engine_new(2);
    int sport, good, anon, rogue;
    CHECK(add_cert_route(e, "srv", srv.port, S2_TLS_SERVER, dir, "prod", &sport) == S2_OK, "add srv");
    CHECK(add_cert_route(e, "good", sport, S2_TLS_CLIENT, dir, "cons", &good) == S2_OK, "add good");
    CHECK(add_cert_route(e, "anon", sport, S2_TLS_CLIENT, dir, "", &anon) == S2_OK, "add anon");
    CHECK(add_cert_route(e, "rogue", sport, S2_TLS_CLIENT, dir, "rogue", &rogue) == S2_OK, "add rogue");
    size_t n = 1u << 20;
    CHECK(roundtrip(good, n), "client certificate of the CA: echo of %zu bytes", n);
    CHECK(!roundtrip(anon, 1000), "a client without a certificate must not get through");
    CHECK(!roundtrip(rogue, 1000), "a certificate of another CA must not get through");
    double end = now_s() + 5;
    while (route_stats(e, "srv").errors[S2_E_TLS_HANDSHAKE] < 2 && now_s() < end) sleep_ms(10);
    s2_route_stats rs = route_stats(e, "srv");
    CHECK(rs.errors[S2_E_TLS_HANDSHAKE] == 2, "server tls_handshake errors %llu",
          (unsigned long long)rs.errors[S2_E_TLS_HANDSHAKE]);
    CHECK(rs.bytes_to_target == n, "only the authenticated client's bytes reached the target: %llu",
          (unsigned long long)rs.bytes_to_target);
    engine_done(e, "tls_mutual_cert");
    server_stop(&srv);
}

static void test_rate_limit(void) {
    struct server srv;
    server_start(&srv, SINK, 0);
    s2_engine *e = engine_new(2);
    int port;
    uint64_t rate = 4u << 20; /* 4 MiB/s, burst rate/10 */
    CHECK(add_route(e, "rl", srv.port, S2_TLS_NONE, 0, NULL, NULL, rate, &port) == S2_OK, "add");
    int fd = dial(port);
    struct sender s = {.fd = fd, .n = 6u << 20};
    double t0 = now_s();
    pthread_t th;
    if (pthread_create(&th, NULL, sender_main, &s) != 0) exit(2);
    unsigned char d[32];
    read_all(fd, d); /* the sink closes after our FIN */
    pthread_join(th, NULL);
    double dt = now_s() - t0;
    close(fd);
    double expect = (double)((6u << 20) - rate / 10) / (double)rate; /* ~1.4 s */
    CHECK(s.rc == 0 && atomic_load(&srv.sunk) == (6 << 20), "all bytes through (%lld)",
          (long long)atomic_load(&srv.sunk));
    CHECK(dt > expect * 0.8 && dt < expect * 2.5, "rate limited transfer took %.2f s, expected ~%.2f s", dt,
          expect);
    engine_done(e, "rate_limit");
    server_stop(&srv);
}

static void test_drain(void) {
    struct server srv;
    server_start(&srv, ECHO, 0);
    s2_engine *e = engine_new(1);
    int port;
    CHECK(add_route(e, "d", srv.port, S2_TLS_NONE, 0, NULL, NULL, 0, &port) == S2_OK, "add");
    int fd = dial(port);
    CHECK(write_all(fd, (const unsigned char *)"x", 1) == 0, "send");
    unsigned char b;
    CHECK(recv(fd, &b, 1, 0) == 1, "echo");
    CHECK(s2_engine_drain(e, 0.2) == 0, "drain times out while a connection is open");
    CHECK(dial(port) < 0, "no new connections while draining");
    shutdown(fd, SHUT_WR);
    unsigned char d[32];
    read_all(fd, d);
    CHECK(s2_engine_drain(e, 5) == 1, "drain finishes once the connection ended");
    close(fd);
    engine_done(e, "drain");
    server_stop(&srv);
}

struct log_count {
    int detail, summary, other_loud;
    char last_summary[240];
};

static void count_log(void *ud, int level, const char *msg) {
    struct log_count *lc = ud;
    if (strstr(msg, "TLS handshake with")) {
        lc->detail++;
    } else if (strstr(msg, "more tls_handshake errors")) {
        lc->summary++;
        snprintf(lc->last_summary, sizeof lc->last_summary, "%s", msg);
    } else if (level >= S2_LOG_WARNING) {
        lc->other_loud++;
        fprintf(stderr, "  engine log %d: %s\n", level, msg);
    }
}

/* 12 failed handshakes on one route: all counted, 5 logged one by one, the other 7 in one
 * summary line when the route is removed. */
static void test_log_limit(void) {
    s2_engine *e = engine_new(2);
    int port;
    CHECK(add_route(e, "lim", free_port(), S2_TLS_SERVER, S2_TLS_PSK, "id", "right-key-right-key", 0, &port) ==
              S2_OK, "add");
    const int n = 12;
    for (int i = 0; i < n; i++) {
        int fd = dial(port);
        CHECK(fd >= 0 && write_all(fd, (const unsigned char *)"GET / HTTP/1.0\r\n\r\n", 18) == 0, "send");
        unsigned char d[32];
        read_all(fd, d);
        close(fd);
    }
    double end = now_s() + 5;
    while (route_stats(e, "lim").errors[S2_E_TLS_HANDSHAKE] < (uint64_t)n && now_s() < end) sleep_ms(10);
    CHECK(route_stats(e, "lim").errors[S2_E_TLS_HANDSHAKE] == (uint64_t)n, "tls_handshake errors %llu",
          (unsigned long long)route_stats(e, "lim").errors[S2_E_TLS_HANDSHAKE]);
    struct log_count lc = {0};
    s2_engine_drain_logs(e, count_log, &lc);
    CHECK(lc.detail == 5 && lc.summary == 0, "before removal: %d lines one by one, %d summaries", lc.detail,
          lc.summary);
    char err[256];
    CHECK(s2_route_remove(e, "lim", 0, err, sizeof err) == S2_OK, "remove: %s", err);
    s2_engine_drain_logs(e, count_log, &lc);
    CHECK(lc.detail == 5 && lc.summary == 1 && lc.other_loud == 0, "after removal: %d, %d summaries, %d other",
          lc.detail, lc.summary, lc.other_loud);
    CHECK(strncmp(lc.last_summary, "route lim: 7 more tls_handshake errors", 38) == 0, "summary: %s",
          lc.last_summary);
    engine_done(e, "log_limit");
}

/* Close while other threads are inside the engine: a drain waiting for an open stream,
 * stats with connection lists, routes added and removed. Close must wait for them (no
 * use after free under ASan, no call left hanging), the drain must give up at once, and
 * every call after close must be refused with S2_ERR_CLOSED. */
struct storm {
    s2_engine *e;
    int kind;               /* 0: drain, 1: stats, 2: add/remove routes */
    int target_port;
    atomic_int *stop;
    int drain_rc;
    int idx;
    int calls, refused, bad, last_bad;
};

static void quiet_log(void *ud, int level, const char *msg) {
    (void)ud, (void)level, (void)msg;
}

static void *storm_main(void *arg) {
    struct storm *st = arg;
    char err[256], id[32];
    if (st->kind == 0) {
        st->drain_rc = s2_engine_drain(st->e, -1); /* forever, but for the close */
        return NULL;
    }
    for (int i = 0; !atomic_load(st->stop); i++) {
        int rc;
        if (st->kind == 1) {
            s2_stats *s = NULL;
            rc = s2_engine_stats(st->e, NULL, 1, &s, err, sizeof err);
            s2_stats_free(s);
        } else {
            snprintf(id, sizeof id, "storm-%d-%d", st->idx, i);
            s2_target_spec t = {"127.0.0.1", st->target_port};
            s2_route_spec r = {.route_id = id, .listen_host = "127.0.0.1", .listen_fd = -1, .targets = &t,
                               .ntargets = 1};
            rc = s2_route_add(st->e, &r, NULL, 0, err, sizeof err);
            if (rc == S2_OK) rc = s2_route_remove(st->e, id, i & 1, err, sizeof err);
            s2_engine_drain_logs(st->e, quiet_log, NULL);
        }
        st->calls++;
        if (rc == S2_ERR_CLOSED)
            st->refused++;
        else if (rc != S2_OK)
            st->bad++, st->last_bad = rc;
    }
    return NULL;
}

static void test_close_under_callers(void) {
    struct server srv;
    server_start(&srv, ECHO, 0);
    s2_engine *e = engine_new(2);
    int port;
    CHECK(add_route(e, "busy", srv.port, S2_TLS_NONE, 0, NULL, NULL, 0, &port) == S2_OK, "add");
    int fd = dial(port);
    unsigned char b = 'x';
    CHECK(fd >= 0 && write_all(fd, &b, 1) == 0 && recv(fd, &b, 1, 0) == 1, "stream open");
    atomic_int stop = 0;
    struct storm st[5];
    pthread_t th[5];
    for (int i = 0; i < 5; i++) {
        st[i] = (struct storm){.e = e, .kind = i == 0 ? 0 : i < 3 ? 1 : 2, .target_port = srv.port,
                               .stop = &stop, .drain_rc = 99, .idx = i};
        if (pthread_create(&th[i], NULL, storm_main, &st[i]) != 0) exit(2);
    }
    sleep_ms(200);
    double t0 = now_s();
    s2_engine_close(e);
    double took = now_s() - t0;
    s2_engine_close(e); /* a second close returns at once */
    atomic_store(&stop, 1);
    for (int i = 0; i < 5; i++) pthread_join(th[i], NULL);
    CHECK(took < 5, "close took %.2f s", took);
    CHECK(st[0].drain_rc == 0, "the drain in progress gave up when the engine closed: %d", st[0].drain_rc);
    for (int i = 1; i < 5; i++)
        CHECK(st[i].calls > 0 && st[i].refused > 0 && st[i].bad == 0,
              "caller %d: %d calls, %d refused, %d failed otherwise (last %d)", i, st[i].calls, st[i].refused,
              st[i].bad, st[i].last_bad);
    unsigned char d[32];
    CHECK(read_all(fd, d) <= 0, "close cut the stream");
    close(fd);
    char err[256] = "";
    s2_stats *s = NULL;
    CHECK(s2_engine_stats(e, NULL, 0, &s, err, sizeof err) == S2_ERR_CLOSED && s == NULL, "stats after close");
    CHECK(strcmp(err, "the engine is closed") == 0, "message: %s", err);
    s2_target_spec lt = {"127.0.0.1", srv.port};
    s2_route_spec late = {.route_id = "late", .listen_host = "127.0.0.1", .listen_fd = -1, .targets = &lt,
                          .ntargets = 1};
    CHECK(s2_route_add(e, &late, NULL, 0, err, sizeof err) == S2_ERR_CLOSED, "add after close");
    CHECK(s2_route_remove(e, "busy", 0, err, sizeof err) == S2_ERR_CLOSED, "remove after close");
    CHECK(s2_route_retarget(e, "busy", &lt, 1, err, sizeof err) == S2_ERR_CLOSED, "retarget after close");
    CHECK(s2_engine_drain(e, 0) == -1, "drain after close");
    s2_resources res;
    s2_engine_resources(e, &res);
    CHECK(!res.fds && !res.pipes && !res.ssl_objects && !res.connections,
          "close gave back everything: fds=%lld conns=%lld", (long long)res.fds, (long long)res.connections);
    engine_done(e, "close_under_callers");
    server_stop(&srv);
}


/* ---- AES-GCM by intel-ipsec-mb (aesgcm.c) --------------------------------- */

/* One message through cipher, called as OpenSSL's TLS 1.3 record layer calls it: the
 * nonce by init, the tag (to open) before the AAD, the text in chunks, final, the tag.
 * Returns 1 if final succeeded; tag in/out. chunk: bytes per update (0 = all at once). */
static int gcm_message(EVP_CIPHER_CTX *ctx, int enc, const unsigned char *iv, const unsigned char *aad,
                       size_t aad_len, const unsigned char *in, unsigned char *out, size_t len, size_t chunk,
                       unsigned char *tag) {
    int n = 0;
    if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, enc) != 1) return 0;
    if (!enc && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, 16, tag) != 1) return 0;
    if (aad_len && EVP_CipherUpdate(ctx, NULL, &n, aad, (int)aad_len) != 1) return 0;
    size_t done = 0;
    while (done < len) {
        size_t step = chunk && chunk < len - done ? chunk : len - done;
        if (EVP_CipherUpdate(ctx, out + done, &n, in + done, (int)step) != 1 || (size_t)n != step) return 0;
        done += step;
    }
    if (EVP_CipherFinal_ex(ctx, out + len, &n) != 1 || n != 0) return 0;
    return !enc || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, tag) == 1;
}

static EVP_CIPHER_CTX *gcm_ctx(EVP_CIPHER *cipher, const unsigned char *key, int enc) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx && EVP_CipherInit_ex(ctx, cipher, NULL, NULL, NULL, enc) == 1 &&
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) == 1 &&
        EVP_CipherInit_ex(ctx, NULL, NULL, key, NULL, -1) == 1)
        return ctx;
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

/* The provider seals exactly as OpenSSL's default provider does (random keys, nonces,
 * AAD and lengths, text in chunks), opens what it sealed, and refuses a changed tag,
 * a changed byte, a missing tag and a second message under a used nonce. */
static void test_aesgcm_provider(void) {
    struct aesgcm_choice choice;
    char err[256] = "";
    if (aesgcm_choose(S2_AES_GCM_IPSEC_MB, &choice, err, sizeof err) != S2_OK) {
        fprintf(stderr, "skip aesgcm_provider (%s)\n", err);
        return;
    }
    const size_t max = 70000;
    unsigned char *in = malloc(max), *ours = malloc(max + 16), *ref = malloc(max + 16), *back = malloc(max + 16);
    CHECK(in && ours && ref && back, "out of memory");
    const char *names[2] = {"AES-128-GCM", "AES-256-GCM"};
    const size_t lens[] = {0, 1, 15, 16, 17, 255, 4096, 16385, 16401, 69999};
    for (int k = 0; k < 2 && in && ours && ref && back; k++) {
        EVP_CIPHER *mine = EVP_CIPHER_fetch(choice.libctx, names[k], choice.propq);
        EVP_CIPHER *dflt = EVP_CIPHER_fetch(NULL, names[k], "provider=default");
        CHECK(mine && dflt, "fetch %s", names[k]);
        if (!mine || !dflt) goto next;
        CHECK(strcmp(OSSL_PROVIDER_get0_name(EVP_CIPHER_get0_provider(mine)), "scistream-aesgcm") == 0,
              "%s: the TLS context's query prefers ours", names[k]);
        for (int round = 0; round < 60; round++) {
            unsigned char key[32], iv[12], aad[13], tag[16], reftag[16];
            size_t len = round < 10 ? lens[round] : 0, chunk = 0, aad_len = (size_t)(round % 14);
            unsigned char r[4];
            RAND_bytes(key, sizeof key);
            RAND_bytes(iv, sizeof iv);
            RAND_bytes(aad, sizeof aad);
            RAND_bytes(r, sizeof r);
            if (round >= 10) len = ((size_t)r[0] << 8 | r[1]) % max;
            if (round % 3 == 1) chunk = 1 + ((size_t)r[2] << 8 | r[3]) % 20000;
            RAND_bytes(in, (int)(len ? len : 1));
            EVP_CIPHER_CTX *enc = gcm_ctx(mine, key, 1), *dec = gcm_ctx(mine, key, 0), *renc = gcm_ctx(dflt, key, 1);
            CHECK(enc && dec && renc, "%s: contexts", names[k]);
            if (enc && dec && renc) {
                CHECK(gcm_message(enc, 1, iv, aad, aad_len, in, ours, len, chunk, tag), "%s seal %zu", names[k], len);
                CHECK(gcm_message(renc, 1, iv, aad, aad_len, in, ref, len, 0, reftag), "reference seal");
                CHECK(memcmp(ours, ref, len) == 0 && memcmp(tag, reftag, 16) == 0,
                      "%s: %zu bytes (chunk %zu, aad %zu) sealed differently from OpenSSL", names[k], len, chunk,
                      aad_len);
                CHECK(gcm_message(dec, 0, iv, aad, aad_len, ours, back, len, chunk, tag) && !memcmp(back, in, len),
                      "%s: open %zu bytes", names[k], len);
                unsigned char bad[16];
                memcpy(bad, tag, 16);
                bad[r[0] % 16] ^= (unsigned char)(1u << (r[1] % 8));
                CHECK(!gcm_message(dec, 0, iv, aad, aad_len, ours, back, len, chunk, bad), "changed tag opened");
                if (len) {
                    ours[r[2] % len] ^= 0x01;
                    CHECK(!gcm_message(dec, 0, iv, aad, aad_len, ours, back, len, chunk, tag), "changed byte opened");
                }
                if (aad_len) {
                    aad[0] ^= 0x80;
                    CHECK(!gcm_message(dec, 0, iv, aad, aad_len, ref, back, len, chunk, tag), "changed AAD opened");
                }
                /* No tag given: final must fail. */
                int n = 0;
                CHECK(EVP_CipherInit_ex(dec, NULL, NULL, NULL, iv, 0) == 1 &&
                          EVP_CipherUpdate(dec, back, &n, ref, (int)len) == 1 && EVP_CipherFinal_ex(dec, back, &n) != 1,
                      "opened without a tag");
                /* The nonce of a sealed message is spent: more text without a new one fails. */
                CHECK(EVP_CipherUpdate(enc, ours, &n, in, 1) != 1, "sealed twice under one nonce");
            }
            EVP_CIPHER_CTX_free(enc);
            EVP_CIPHER_CTX_free(dec);
            EVP_CIPHER_CTX_free(renc);
        }
    next:
        EVP_CIPHER_free(mine);
        EVP_CIPHER_free(dflt);
    }
    free(in);
    free(ours);
    free(ref);
    free(back);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    struct {
        const char *name;
        void (*fn)(void);
    } tests[] = {
        {"plain_forward", test_plain_forward},
        {"half_close", test_half_close},
        {"refused_target", test_refused_target},
        {"routes", test_routes},
        {"remove_while_streaming", test_remove_while_streaming},
        {"tls_wrong_key", test_tls_wrong_key},
        {"tls_key_update_half_close", test_tls_key_update_half_close},
        {"rate_limit", test_rate_limit},
        {"drain", test_drain},
        {"log_limit", test_log_limit},
        {"close_under_callers", test_close_under_callers},
        {"aesgcm_provider", test_aesgcm_provider},
    };
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        int before = failures;
        double t0 = now_s();
        tests[i].fn();
        fprintf(stderr, "%s %s (%.2f s)\n", failures == before ? "ok  " : "FAIL", tests[i].name,
                now_s() - t0);
    }
    int before = failures;
    test_tls_psk_pair(S2_TLS_PSK);
    fprintf(stderr, "%s tls_psk_pair\n", failures == before ? "ok  " : "FAIL");
    before = failures;
    test_tls_psk_pair(S2_TLS_COMPAT);
    fprintf(stderr, "%s tls_compat_pair\n", failures == before ? "ok  " : "FAIL");
    const char *cert_dir = getenv("S2_TEST_CERT_DIR");
    if (cert_dir && *cert_dir) {
        before = failures;
        test_tls_mutual_cert(cert_dir);
        fprintf(stderr, "%s tls_mutual_cert\n", failures == before ? "ok  " : "FAIL");
    } else {
        fprintf(stderr, "skip tls_mutual_cert (S2_TEST_CERT_DIR not set)\n");
    }
    fprintf(stderr, "%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
    return failures ? 1 : 0;
}
