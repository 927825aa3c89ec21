/* The SciStream data-plane engine: public C API.
 *
 * One engine runs N worker threads, each with its own epoll loop. Routes
 * (listener -> targets, optional TLS leg, rate cap) are added, retargeted and
 * removed by commands posted to the workers; every call here is thread-safe,
 * blocks until the command took effect, and never calls back into the caller.
 * Plain C11 + pthreads + OpenSSL 3; no Python.
 */
#ifndef SCISTREAM_ENGINE_H
#define SCISTREAM_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Result codes of every command. */
enum s2_status {
    S2_OK = 0,
    S2_ERR_EXISTS = 1,     /* a route with this id exists */
    S2_ERR_NOT_FOUND = 2,  /* no route with this id */
    S2_ERR_ADDR_IN_USE = 3,/* the listen address is taken */
    S2_ERR_INVALID = 4,    /* the route or tuning is not acceptable */
    S2_ERR_INTERNAL = 5,   /* anything else (out of memory, thread start...) */
    S2_ERR_CLOSED = 6      /* the engine was closed (s2_engine_close) */
};

/* Error kinds counted per route; same order and names as api.ERROR_KINDS. */
enum s2_error_kind {
    S2_E_ACCEPT = 0,
    S2_E_CONNECT_REFUSED,
    S2_E_CONNECT_TIMEOUT,
    S2_E_CONNECT_ERROR,
    S2_E_TLS_HANDSHAKE,
    S2_E_RESET,
    S2_E_IDLE_TIMEOUT,
    S2_E_MAX_CONNECTIONS,
    S2_E_IO,
    S2_E_COUNT
};
extern const char *const s2_error_kind_names[S2_E_COUNT];

enum s2_tls_role { S2_TLS_NONE = 0, S2_TLS_SERVER = 1, S2_TLS_CLIENT = 2 };
enum s2_tls_mode { S2_TLS_PSK = 0, S2_TLS_COMPAT = 1, S2_TLS_CERT = 2 };

/* What seals TLS 1.3 records with AES-GCM (aesgcm.c). */
enum s2_aes_gcm { S2_AES_GCM_AUTO = 0, S2_AES_GCM_OPENSSL = 1, S2_AES_GCM_IPSEC_MB = 2 };

enum s2_log_level { S2_LOG_DEBUG = 10, S2_LOG_INFO = 20, S2_LOG_WARNING = 30, S2_LOG_ERROR = 40 };

/* Engine-wide knobs; see docs/TUNING.md. Zero means "kernel/engine default"
 * wherever api.Tuning says so. */
typedef struct s2_tuning {
    int workers;
    int pipe_size;
    int tls_buffer_size;
    int sndbuf;
    int rcvbuf;
    int nodelay;
    char congestion[32];
    int notsent_lowat;
    int cpu_affinity;
    int backlog;
    int max_connections;
    double connect_timeout;
    double idle_timeout;
    int tcp_user_timeout;
    uint64_t tls_key_update_bytes;
    int tls_aes_gcm; /* enum s2_aes_gcm */
} s2_tuning;

typedef struct s2_target_spec {
    const char *host;
    int port;
} s2_target_spec;

typedef struct s2_route_spec {
    const char *route_id;
    const char *listen_host; /* ignored when listen_fd >= 0 */
    int listen_port;
    int listen_fd;           /* adopted: the engine works on a dup() of it */
    const s2_target_spec *targets;
    int ntargets;
    int tls_role;            /* enum s2_tls_role */
    int tls_mode;            /* enum s2_tls_mode */
    const char *psk_identity;
    const unsigned char *psk_key;
    size_t psk_key_len;
    const char *cert_file;
    const char *key_file;
    const char *ca_file;
    const char *server_name;
    const char *ciphers;     /* "" = the mode's default */
    uint64_t rate_limit;     /* bytes/s over both directions; 0 = none */
    int max_connections;     /* 0 = tuning.max_connections */
} s2_route_spec;

typedef struct s2_conn_stats {
    uint64_t conn_id;
    char peer[80];
    char *target;            /* owned by the snapshot */
    uint64_t bytes_to_target;
    uint64_t bytes_from_target;
    double started_at;
} s2_conn_stats;

typedef struct s2_route_stats {
    char *route_id;
    char bound[80];
    char **targets;
    int ntargets;
    uint64_t bytes_to_target;
    uint64_t bytes_from_target;
    int64_t connections_active;
    uint64_t connections_total;
    uint64_t errors[S2_E_COUNT];
    uint64_t tls_key_updates;
    double started_at;
    s2_conn_stats *conns;
    size_t nconns;
} s2_route_stats;

typedef struct s2_stats {
    int workers;
    s2_route_stats *routes;
    size_t nroutes;
} s2_stats;

typedef struct s2_resources {
    int64_t fds, pipes, ssl_objects, connections; /* open now; 0 when all came back */
} s2_resources;

typedef struct s2_engine s2_engine;

/* Fill *t with api.Tuning's defaults. */
void s2_tuning_defaults(s2_tuning *t);

/* Start the workers. On failure returns a status and writes a sentence to err. */
int s2_engine_new(const s2_tuning *t, s2_engine **out, char *err, size_t errlen);
/* Stop the workers, close every route and connection, give back every fd, pipe and
 * SSL object. Thread-safe against every other call: it refuses new calls, makes a
 * drain in progress return 0 at once and waits for the calls in progress to return
 * before it tears anything down; a second close waits for the first. After it every
 * call is refused with S2_ERR_CLOSED (drain: -1) but the handle stays valid memory:
 * s2_engine_resources, s2_engine_workers and s2_engine_drain_logs still answer. */
void s2_engine_close(s2_engine *e);
/* Close (if not yet) and free the handle. The caller must know that no other thread
 * is in, or will enter, any call on e: that is what close cannot promise. */
void s2_engine_free(s2_engine *e);
int s2_engine_workers(const s2_engine *e);

int s2_route_add(s2_engine *e, const s2_route_spec *spec, char *bound, size_t boundlen,
                 char *err, size_t errlen);
int s2_route_retarget(s2_engine *e, const char *route_id, const s2_target_spec *targets,
                      int ntargets, char *err, size_t errlen);
int s2_route_remove(s2_engine *e, const char *route_id, int drain, char *err, size_t errlen);

/* Stop accepting everywhere; wait up to timeout seconds (<0: forever) for every
 * connection to end. Returns 1 when none is left, 0 when the timeout passed or the
 * engine was closed meanwhile, -1 when it was closed before the call. */
int s2_engine_drain(s2_engine *e, double timeout);

/* Snapshot of one route (route_id != NULL) or all; with_conns adds the
 * connection list (collected by each worker in its own loop). */
int s2_engine_stats(s2_engine *e, const char *route_id, int with_conns, s2_stats **out,
                    char *err, size_t errlen);
void s2_stats_free(s2_stats *s);

void s2_engine_resources(s2_engine *e, s2_resources *out);

/* Log lines are queued (bounded ring) and handed out here; never printed. */
typedef void (*s2_log_sink)(void *ud, int level, const char *msg);
void s2_engine_drain_logs(s2_engine *e, s2_log_sink sink, void *ud);

#ifdef __cplusplus
}
#endif
#endif
