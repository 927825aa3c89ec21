# cython: language_level=3
"""Thin binding over csrc/engine.h: converts arguments, releases the GIL around
every engine call, maps status codes to the api exceptions. Policy lives in
native.py.

Lifetime: ``close()`` is s2_engine_close, which waits for the calls in progress
and refuses every later one (S2_ERR_CLOSED -> EngineError); the handle's memory
is freed only in ``__dealloc__``, when no thread can be inside a method any more
(each call in progress holds a reference to the wrapper)."""

from libc.stdlib cimport calloc, free
from libc.string cimport strncpy

from scistream.dataplane.api import (
    AddressInUse,
    EngineError,
    InvalidRoute,
    RouteExists,
    RouteNotFound,
)

ERROR_KIND_NAMES = tuple(s2_error_kind_names[i].decode() for i in range(S2_E_COUNT))

cdef dict _ERRORS = {
    S2_ERR_EXISTS: RouteExists,
    S2_ERR_NOT_FOUND: RouteNotFound,
    S2_ERR_ADDR_IN_USE: AddressInUse,
    S2_ERR_INVALID: InvalidRoute,
    S2_ERR_INTERNAL: EngineError,
    S2_ERR_CLOSED: EngineError,
}

# Tuning.tls_aes_gcm (api.AES_GCM_CHOICES) -> enum s2_aes_gcm
cdef dict _AES_GCM = {
    "auto": S2_AES_GCM_AUTO,
    "openssl": S2_AES_GCM_OPENSSL,
    "ipsec-mb": S2_AES_GCM_IPSEC_MB,
}

cdef int _check(int rc, char *err) except -1:
    if rc != S2_OK:
        raise _ERRORS.get(rc, EngineError)(err.decode("utf-8", "replace"))
    return 0


cdef void _log_sink(void *ud, int level, const char *msg) noexcept with gil:
    try:
        (<object>ud)(level, msg.decode("utf-8", "replace"))
    except BaseException:
        pass


cdef class CEngine:
    """One C engine. Every method is thread-safe (the C side serialises), close too."""

    cdef s2_engine *e

    def __cinit__(self, dict tuning):
        cdef s2_tuning t
        cdef char err[256]
        cdef int rc
        s2_tuning_defaults(&t)
        t.workers = tuning["workers"]
        t.pipe_size = tuning["pipe_size"]
        t.tls_buffer_size = tuning["tls_buffer_size"]
        t.sndbuf = tuning["sndbuf"]
        t.rcvbuf = tuning["rcvbuf"]
        t.nodelay = 1 if tuning["nodelay"] else 0
        cong = tuning["congestion"].encode()
        if len(cong) >= 32:
            raise InvalidRoute("congestion control name is too long")
        strncpy(t.congestion, cong, 31)
        t.notsent_lowat = tuning["notsent_lowat"]
        t.cpu_affinity = 1 if tuning["cpu_affinity"] else 0
        t.backlog = tuning["backlog"]
        t.max_connections = tuning["max_connections"]
        t.connect_timeout = tuning["connect_timeout"]
        t.idle_timeout = tuning["idle_timeout"]
        t.tcp_user_timeout = tuning["tcp_user_timeout"]
        t.tls_key_update_bytes = tuning["tls_key_update_bytes"]
        t.tls_aes_gcm = _AES_GCM[tuning["tls_aes_gcm"]]
        err[0] = 0
        with nogil:
            rc = s2_engine_new(&t, &self.e, err, sizeof(err))
        _check(rc, err)

    def __dealloc__(self):
        if self.e is not NULL:
            with nogil:
                s2_engine_free(self.e)
            self.e = NULL

    @property
    def workers(self):
        return s2_engine_workers(self.e)

    def close(self):
        """Cut every connection and give everything back; waits for the calls in
        progress (a drain returns False at once). Every later call raises EngineError."""
        with nogil:
            s2_engine_close(self.e)

    def add_route(self, str route_id, str listen_host, int listen_port, int listen_fd, list targets,
                  int tls_role, int tls_mode, str psk_identity, bytes psk_key, str cert_file,
                  str key_file, str ca_file, str server_name, str ciphers,
                  unsigned long long rate_limit, int max_connections):
        """Returns the bound address "host:port"."""
        cdef s2_engine *e = self.e
        cdef s2_route_spec spec
        cdef char err[256]
        cdef char bound[80]
        cdef int rc
        cdef s2_target_spec *tv = _targets(targets)
        keep = [s.encode() for s in (route_id, listen_host, psk_identity, cert_file, key_file,
                                     ca_file, server_name, ciphers)]
        keep.append(psk_key)
        keep.append([h.encode() for h, _ in targets])
        try:
            _fill_targets(tv, keep[-1], targets)
            spec.route_id = keep[0]
            spec.listen_host = keep[1]
            spec.listen_port = listen_port
            spec.listen_fd = listen_fd
            spec.targets = tv
            spec.ntargets = len(targets)
            spec.tls_role = tls_role
            spec.tls_mode = tls_mode
            spec.psk_identity = keep[2]
            spec.psk_key = <const unsigned char *><char *>psk_key
            spec.psk_key_len = len(psk_key)
            spec.cert_file = keep[3]
            spec.key_file = keep[4]
            spec.ca_file = keep[5]
            spec.server_name = keep[6]
            spec.ciphers = keep[7]
            spec.rate_limit = rate_limit
            spec.max_connections = max_connections
            err[0] = 0
            bound[0] = 0
            with nogil:
                rc = s2_route_add(e, &spec, bound, sizeof(bound), err, sizeof(err))
            _check(rc, err)
            return bound.decode()
        finally:
            free(tv)

    def retarget(self, str route_id, list targets):
        cdef s2_engine *e = self.e
        cdef char err[256]
        cdef int rc
        cdef int n = len(targets)
        cdef s2_target_spec *tv = _targets(targets)
        rid = route_id.encode()
        cdef const char *crid = rid
        hosts = [h.encode() for h, _ in targets]
        try:
            _fill_targets(tv, hosts, targets)
            err[0] = 0
            with nogil:
                rc = s2_route_retarget(e, crid, tv, n, err, sizeof(err))
            _check(rc, err)
        finally:
            free(tv)

    def remove_route(self, str route_id, bint drain):
        cdef s2_engine *e = self.e
        cdef char err[256]
        cdef int rc
        cdef int d = drain
        rid = route_id.encode()
        cdef const char *crid = rid
        err[0] = 0
        with nogil:
            rc = s2_route_remove(e, crid, d, err, sizeof(err))
        _check(rc, err)

    def drain(self, double timeout):
        """Negative timeout: wait forever. True when no connection is left; False when
        the timeout passed or the engine was closed meanwhile."""
        cdef s2_engine *e = self.e
        cdef int rc
        with nogil:
            rc = s2_engine_drain(e, timeout)
        if rc < 0:
            raise EngineError("the engine is closed")
        return rc == 1

    def stats(self, route_id, bint connections):
        """A list of dicts, one per route (see s2_route_stats)."""
        cdef s2_engine *e = self.e
        cdef s2_stats *s = NULL
        cdef char err[256]
        cdef int rc
        cdef int wc = connections
        cdef const char *crid = NULL
        cdef s2_route_stats *r
        rid = route_id.encode() if route_id is not None else None
        if rid is not None:
            crid = rid
        err[0] = 0
        with nogil:
            rc = s2_engine_stats(e, crid, wc, &s, err, sizeof(err))
        _check(rc, err)
        out = []
        try:
            for i in range(s.nroutes):
                r = &s.routes[i]
                out.append({
                    "route_id": r.route_id.decode() if r.route_id is not NULL else "",
                    "bound": r.bound.decode(),
                    "targets": tuple(r.targets[k].decode() for k in range(r.ntargets)
                                     if r.targets[k] is not NULL),
                    "bytes_to_target": r.bytes_to_target,
                    "bytes_from_target": r.bytes_from_target,
                    "connections_active": r.connections_active,
                    "connections_total": r.connections_total,
                    "errors": {ERROR_KIND_NAMES[k]: r.errors[k] for k in range(S2_E_COUNT)},
                    "tls_key_updates": r.tls_key_updates,
                    "started_at": r.started_at,
                    "connections": [
                        (r.conns[k].conn_id, r.conns[k].peer.decode(),
                         r.conns[k].target.decode() if r.conns[k].target is not NULL else "",
                         r.conns[k].bytes_to_target, r.conns[k].bytes_from_target,
                         r.conns[k].started_at)
                        for k in range(r.nconns)
                    ],
                })
            return s.workers, out
        finally:
            s2_stats_free(s)

    def resources(self):
        cdef s2_resources res
        s2_engine_resources(self.e, &res)
        return res.fds, res.pipes, res.ssl_objects, res.connections

    def drain_logs(self, sink):
        """Hand queued engine log lines to sink(level, message); works after close too."""
        s2_engine_drain_logs(self.e, _log_sink, <void *>sink)


cdef s2_target_spec *_targets(list targets) except NULL:
    cdef s2_target_spec *tv = <s2_target_spec *>calloc(max(len(targets), 1), sizeof(s2_target_spec))
    if tv is NULL:
        raise MemoryError()
    return tv


cdef int _fill_targets(s2_target_spec *tv, list hosts, list targets) except -1:
    for i, (host, port) in enumerate(targets):
        tv[i].host = <const char *>(<bytes>hosts[i])
        tv[i].port = port
    return 0
