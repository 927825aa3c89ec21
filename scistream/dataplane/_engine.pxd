# The C API of the data-plane engine (csrc/engine.h), as Cython sees it.
from libc.stdint cimport int64_t, uint64_t


cdef extern from "engine.h" nogil:
    enum:
        S2_OK
        S2_ERR_EXISTS
        S2_ERR_NOT_FOUND
        S2_ERR_ADDR_IN_USE
        S2_ERR_INVALID
        S2_ERR_INTERNAL
        S2_ERR_CLOSED
        S2_E_COUNT
        S2_AES_GCM_AUTO
        S2_AES_GCM_OPENSSL
        S2_AES_GCM_IPSEC_MB

    const char *s2_error_kind_names[]

    ctypedef struct s2_tuning:
        int workers
        int pipe_size
        int tls_buffer_size
        int sndbuf
        int rcvbuf
        int nodelay
        char congestion[32]
        int notsent_lowat
        int cpu_affinity
        int backlog
        int max_connections
        double connect_timeout
        double idle_timeout
        int tcp_user_timeout
        uint64_t tls_key_update_bytes
        int tls_aes_gcm

    ctypedef struct s2_target_spec:
        const char *host
        int port

    ctypedef struct s2_route_spec:
        const char *route_id
        const char *listen_host
        int listen_port
        int listen_fd
        const s2_target_spec *targets
        int ntargets
        int tls_role
        int tls_mode
        const char *psk_identity
        const unsigned char *psk_key
        size_t psk_key_len
        const char *cert_file
        const char *key_file
        const char *ca_file
        const char *server_name
        const char *ciphers
        uint64_t rate_limit
        int max_connections

    ctypedef struct s2_conn_stats:
        uint64_t conn_id
        char peer[80]
        char *target
        uint64_t bytes_to_target
        uint64_t bytes_from_target
        double started_at

    ctypedef struct s2_route_stats:
        char *route_id
        char bound[80]
        char **targets
        int ntargets
        uint64_t bytes_to_target
        uint64_t bytes_from_target
        int64_t connections_active
        uint64_t connections_total
        uint64_t errors[9]
        uint64_t tls_key_updates
        double started_at
        s2_conn_stats *conns
        size_t nconns

    ctypedef struct s2_stats:
        int workers
        s2_route_stats *routes
        size_t nroutes

    ctypedef struct s2_resources:
        int64_t fds
        int64_t pipes
        int64_t ssl_objects
        int64_t connections

    ctypedef struct s2_engine:
        pass

    ctypedef void (*s2_log_sink)(void *ud, int level, const char *msg)

    void s2_tuning_defaults(s2_tuning *t)
    int s2_engine_new(const s2_tuning *t, s2_engine **out, char *err, size_t errlen)
    void s2_engine_close(s2_engine *e)
    void s2_engine_free(s2_engine *e)
    int s2_engine_workers(const s2_engine *e)
    int s2_route_add(s2_engine *e, const s2_route_spec *spec, char *bound, size_t boundlen,
                     char *err, size_t errlen)
    int s2_route_retarget(s2_engine *e, const char *route_id, const s2_target_spec *targets,
                          int ntargets, char *err, size_t errlen)
    int s2_route_remove(s2_engine *e, const char *route_id, int drain, char *err, size_t errlen)
    int s2_engine_drain(s2_engine *e, double timeout)
    int s2_engine_stats(s2_engine *e, const char *route_id, int with_conns, s2_stats **out,
                        char *err, size_t errlen)
    void s2_stats_free(s2_stats *s)
    void s2_engine_resources(s2_engine *e, s2_resources *out)
    void s2_engine_drain_logs(s2_engine *e, s2_log_sink sink, void *ud)
