/* TLS contexts for a route's TLS leg: psk (TLS 1.3 external PSK), compat
 * (SciStream 1.x stunnel: TLS 1.2 PSK) and cert (certificate + pinned CA),
 * and the SSL of one connection (its BIOs are in tlsbio.c).
 *
 * The external PSK is bound to SHA-256: RFC 8446 4.2.11 makes SHA-256 the hash
 * of an external PSK that names none, and it is what stunnel and openssl
 * s_client / s_server use. A TLS 1.3 PSK handshake works only with a suite of
 * the PSK's hash, and the server picks the suite (from the client's list)
 * before it looks at the PSK. So in psk mode both sides offer SHA-256 suites
 * only, and the server picks by its own order (AES-128-GCM first). Building
 * the PSK session for whatever hash the suite has instead (e.g. SHA-384) does
 * not help: the client computed its binder with SHA-256, the server would
 * check it with SHA-384 and abort, and one key under two hashes is what
 * RFC 8446 forbids. */
#include <errno.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

/* AES-128-GCM first: the fastest suite on CPUs with AES-NI. SSL_OP_PRIORITIZE_CHACHA
 * still gives ChaCha20 to a client that lists it first (one without AES hardware). */
#define TLS13_PSK_SUITES "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"
#define TLS13_CERT_SUITES "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
#define COMPAT_CIPHERS \
    "ECDHE-PSK-AES128-CBC-SHA256:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-NULL-SHA256"
/* The PSK session's suite: its hash (SHA-256) is the PSK's hash. */
static const unsigned char PSK_SUITE_ID[2] = {0x13, 0x01}; /* TLS_AES_128_GCM_SHA256 */

/* OpenSSL's read-ahead buffer, used only with kernel TLS (a socket BIO; otherwise the
 * record reader BIO reads ahead, tlsbio.c): it aligns the payload, which leaves
 * len - 3 bytes for records in a buffer from glibc's malloc. Sized so that the rest
 * holds whole full-size records: a read then never ends inside a record. */
#define READ_BUFFER_LEN (8 * TLS_RECORD_WIRE + 3)

static void ssl_err(char *err, size_t errlen, const char *what) {
    char why[160] = "unknown error";
    unsigned long e = ERR_peek_last_error();
    if (e) ERR_error_string_n(e, why, sizeof why);
    ERR_clear_error();
    snprintf(err, errlen, "%s: %s", what, why);
}

static struct tls_conf *conf_of(SSL *ssl) {
    return SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
}

static int is_sha256(const EVP_MD *md) { return md && EVP_MD_get_type(md) == NID_sha256; }

static SSL_SESSION *psk_session(SSL *ssl, const struct tls_conf *tc) {
    const SSL_CIPHER *cipher = SSL_CIPHER_find(ssl, PSK_SUITE_ID);
    if (!cipher) return NULL;
    SSL_SESSION *s = SSL_SESSION_new();
    if (!s) return NULL;
    if (!SSL_SESSION_set1_master_key(s, tc->key, tc->key_len) || !SSL_SESSION_set_cipher(s, cipher) ||
        !SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION)) {
        SSL_SESSION_free(s);
        return NULL;
    }
    return s;
}

/* Server: an unknown identity gets no session, so the handshake falls back to
 * certificates, of which there are none: it fails. */
static int psk_find_session(SSL *ssl, const unsigned char *id, size_t idlen, SSL_SESSION **sess) {
    const struct tls_conf *tc = conf_of(ssl);
    *sess = NULL;
    if (idlen != strlen(tc->identity) || memcmp(id, tc->identity, idlen) != 0) return 1;
    *sess = psk_session(ssl, tc);
    return *sess ? 1 : 0;
}

static int psk_use_session(SSL *ssl, const EVP_MD *md, const unsigned char **id, size_t *idlen,
                           SSL_SESSION **sess) {
    const struct tls_conf *tc = conf_of(ssl);
    SSL_SESSION *s = psk_session(ssl, tc);
    if (!s) return 0;
    /* md is set on the second ClientHello (after a HelloRetryRequest): the hash of
     * the suite the server picked. Compared by type: OpenSSL passes a fetched
     * EVP_MD, which is never the same pointer as the cipher's legacy one. */
    if (md && !is_sha256(md)) {
        /* The server picked a suite whose hash does not fit this PSK: offer none,
         * and refuse_certificate() ends the handshake. */
        SSL_SESSION_free(s);
        *id = NULL;
        *idlen = 0;
        *sess = NULL;
        return 1;
    }
    *id = (const unsigned char *)tc->identity;
    *idlen = strlen(tc->identity);
    *sess = s;
    return 1;
}

/* A PSK client wants the peer to prove it holds the key, nothing else: a server
 * that ignores the PSK and shows a certificate instead (any certificate, from
 * anyone) is refused. Without this, a TLS 1.3 server that does not know the key
 * could complete a certificate handshake and read the stream. */
static int refuse_certificate(int ok, X509_STORE_CTX *store) {
    (void)ok;
    (void)store;
    return 0;
}

/* Keep only the TLS 1.3 suites (key exchange "any") whose hash is the PSK's (SHA-256); 0 if none is left. */
static int keep_psk_suites(SSL_CTX *ctx) {
    STACK_OF(SSL_CIPHER) *all = SSL_CTX_get_ciphers(ctx);
    char list[512] = "";
    size_t used = 0;
    for (int i = 0; all && i < sk_SSL_CIPHER_num(all); i++) {
        const SSL_CIPHER *c = sk_SSL_CIPHER_value(all, i);
        if (SSL_CIPHER_get_kx_nid(c) != NID_kx_any || !is_sha256(SSL_CIPHER_get_handshake_digest(c)))
            continue;
        int n = snprintf(list + used, sizeof list - used, "%s%s", used ? ":" : "", SSL_CIPHER_standard_name(c));
        if (n < 0 || (size_t)n >= sizeof list - used) return 0;
        used += (size_t)n;
    }
    return used && SSL_CTX_set_ciphersuites(ctx, list);
}

static unsigned int compat_server_cb(SSL *ssl, const char *identity, unsigned char *psk,
                                     unsigned int max_len) {
    const struct tls_conf *tc = conf_of(ssl);
    if (!identity || strcmp(identity, tc->identity) != 0 || tc->key_len > max_len) return 0;
    memcpy(psk, tc->key, tc->key_len);
    return (unsigned int)tc->key_len;
}

static unsigned int compat_client_cb(SSL *ssl, const char *hint, char *identity,
                                     unsigned int max_identity_len, unsigned char *psk,
                                     unsigned int max_psk_len) {
    (void)hint;
    const struct tls_conf *tc = conf_of(ssl);
    if (strlen(tc->identity) + 1 > max_identity_len || tc->key_len > max_psk_len) return 0;
    memcpy(identity, tc->identity, strlen(tc->identity) + 1);
    memcpy(psk, tc->key, tc->key_len);
    return (unsigned int)tc->key_len;
}

void tls_conf_clear(struct tls_conf *tc) {
    if (tc->ctx) SSL_CTX_free(tc->ctx);
    if (tc->key) {
        OPENSSL_cleanse(tc->key, tc->key_len);
        free(tc->key);
    }
    free(tc->identity);
    free(tc->server_name);
    memset(tc, 0, sizeof *tc);
}

/* ---- kernel TLS ---------------------------------------------------------------
 * With kTLS the kernel builds the records (no record copy in user space, and
 * sendfile/splice become possible). It needs OpenSSL built with it (Debian's
 * 3.0 is) and a kernel with CONFIG_TLS: probed once, by asking for the "tls"
 * ULP on a loopback connection (which also loads the module where it exists).
 * OpenSSL 3.0 cannot give the kernel a new key after a TLS 1.3 KeyUpdate (the
 * kernel keeps encrypting with the old one), so the engine asks for kTLS only
 * where no key update is due (tls_key_update_bytes 0): the byte-threshold key
 * update always wins. On a socket where OpenSSL did not switch kTLS on (no
 * kernel support, a cipher the kernel lacks), the write side falls back to the
 * gather BIO after the handshake (tls_established). */
static int ktls_usable;
static pthread_once_t ktls_once = PTHREAD_ONCE_INIT;

static void ktls_probe(void) {
#if defined(SSL_OP_ENABLE_KTLS) && !defined(OPENSSL_NO_KTLS) && defined(TCP_ULP)
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof sa;
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), c = -1, a = -1;
    if (l >= 0 && bind(l, (struct sockaddr *)&sa, sl) == 0 && listen(l, 1) == 0 &&
        getsockname(l, (struct sockaddr *)&sa, &sl) == 0 &&
        (c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) >= 0 &&
        connect(c, (struct sockaddr *)&sa, sl) == 0 && (a = accept4(l, NULL, NULL, SOCK_CLOEXEC)) >= 0)
        ktls_usable = setsockopt(c, IPPROTO_TCP, TCP_ULP, "tls", sizeof "tls") == 0;
    if (a >= 0) close(a);
    if (c >= 0) close(c);
    if (l >= 0) close(l);
#endif
}

int tls_ktls_available(void) {
    pthread_once(&ktls_once, ktls_probe);
    return ktls_usable;
}

int tls_conf_build(struct tls_conf *tc, const s2_route_spec *spec, int want_ktls, const struct aesgcm_choice *aes,
                   char *err, size_t errlen) {
    memset(tc, 0, sizeof *tc);
    tc->role = spec->tls_role;
    tc->mode = spec->tls_mode;
    int server = spec->tls_role == S2_TLS_SERVER;
    const char *ciphers = spec->ciphers && *spec->ciphers ? spec->ciphers : NULL;
    if (spec->tls_mode != S2_TLS_CERT) {
        if (!spec->psk_identity || !*spec->psk_identity || !spec->psk_key || !spec->psk_key_len ||
            spec->psk_key_len > 256) {
            snprintf(err, errlen, "TLS PSK needs an identity and a key of 1-256 bytes");
            return S2_ERR_INVALID;
        }
        tc->identity = strdup(spec->psk_identity);
        tc->key = malloc(spec->psk_key_len);
        if (!tc->identity || !tc->key) goto oom;
        memcpy(tc->key, spec->psk_key, spec->psk_key_len);
        tc->key_len = spec->psk_key_len;
    }
    if (spec->server_name && *spec->server_name) {
        tc->server_name = strdup(spec->server_name);
        if (!tc->server_name) goto oom;
    }
    /* TLS 1.3 contexts take AES-GCM where aes says; compat (TLS 1.2) keeps OpenSSL's whole. */
    int tls13 = spec->tls_mode != S2_TLS_COMPAT;
    SSL_CTX *ctx = SSL_CTX_new_ex(tls13 ? aes->libctx : NULL, tls13 ? aes->propq : NULL,
                                  server ? TLS_server_method() : TLS_client_method());
    if (!ctx) {
        ssl_err(err, errlen, "cannot create a TLS context");
        tls_conf_clear(tc);
        return S2_ERR_INTERNAL;
    }
    tc->ctx = ctx;
    SSL_CTX_set_app_data(ctx, tc);
    /* Partial writes + moving buffer: the pump hands SSL_write_ex whatever is
     * buffered and may compact the buffer between retries. */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* A peer closing TCP without close_notify ends its direction like EOF, as stunnel does. */
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_RENEGOTIATION);
    /* The server picks the suite by its own order: the one that fits the PSK's
     * hash, and the cheapest one (AES-128-GCM), whatever order a client lists. */
    if (server) SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_PRIORITIZE_CHACHA);
#if defined(SSL_OP_ENABLE_KTLS) && !defined(OPENSSL_NO_KTLS)
    if (want_ktls && tls_ktls_available()) {
        SSL_CTX_set_options(ctx, SSL_OP_ENABLE_KTLS);
        SSL_CTX_set_read_ahead(ctx, 1);
        SSL_CTX_set_default_read_buffer_len(ctx, READ_BUFFER_LEN);
        tc->ktls = 1;
    }
#else
    (void)want_ktls;
#endif
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx, 0);
    int ok = 1;
    const char *what = "TLS setup";
    switch (spec->tls_mode) {
    case S2_TLS_PSK:
        ok = SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) &&
             SSL_CTX_set_ciphersuites(ctx, ciphers ? ciphers : TLS13_PSK_SUITES);
        what = "the TLS 1.3 cipher suites";
        if (ok && !keep_psk_suites(ctx)) {
            ok = 0;
            ERR_clear_error();
            snprintf(err, errlen,
                     "TLS 1.3 PSK needs a SHA-256 suite (TLS_AES_128_GCM_SHA256 or "
                     "TLS_CHACHA20_POLY1305_SHA256): the PSK is bound to SHA-256, got '%s'",
                     ciphers ? ciphers : "");
            tls_conf_clear(tc);
            return S2_ERR_INVALID;
        }
        if (server) {
            SSL_CTX_set_psk_find_session_callback(ctx, psk_find_session);
        } else {
            SSL_CTX_set_psk_use_session_callback(ctx, psk_use_session);
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, refuse_certificate);
        }
        break;
    case S2_TLS_COMPAT: {
        /* PSK suites only; aNULL is removed for good even if the caller asks.
         * SECLEVEL=0 lets PSK-NULL-SHA256 (what a 1.x `ciphers = eNULL` peer has) through. */
        char list[1024];
        snprintf(list, sizeof list, "%s:!aNULL:@SECLEVEL=0", ciphers ? ciphers : COMPAT_CIPHERS);
        ok = SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) &&
             SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION) && SSL_CTX_set_cipher_list(ctx, list);
        what = "the TLS 1.2 PSK cipher list";
        if (server) {
            SSL_CTX_set_psk_server_callback(ctx, compat_server_cb);
        } else {
            SSL_CTX_set_psk_client_callback(ctx, compat_client_cb);
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, refuse_certificate);
        }
        break;
    }
    case S2_TLS_CERT:
        ok = SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) &&
             SSL_CTX_set_ciphersuites(ctx, ciphers ? ciphers : TLS13_CERT_SUITES);
        what = "the TLS 1.3 cipher suites";
        /* Server: its certificate, and with a CA file it requires a client certificate
         * that chains to it (gateways authenticating each other). Client: the CA file
         * it pins, and with a certificate it presents one. */
        if (ok && server) {
            what = "loading the certificate and key";
            ok = spec->cert_file && spec->key_file &&
                 SSL_CTX_use_certificate_chain_file(ctx, spec->cert_file) == 1 &&
                 SSL_CTX_use_PrivateKey_file(ctx, spec->key_file, SSL_FILETYPE_PEM) == 1 &&
                 SSL_CTX_check_private_key(ctx) == 1;
            if (ok && spec->ca_file && *spec->ca_file) {
                what = "loading the client CA file";
                ok = SSL_CTX_load_verify_locations(ctx, spec->ca_file, NULL) == 1;
                SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
            }
        } else if (ok) {
            what = "loading the CA file";
            ok = spec->ca_file && SSL_CTX_load_verify_locations(ctx, spec->ca_file, NULL) == 1;
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
            if (ok && spec->cert_file && *spec->cert_file) {
                what = "loading the client certificate and key";
                ok = spec->key_file && SSL_CTX_use_certificate_chain_file(ctx, spec->cert_file) == 1 &&
                     SSL_CTX_use_PrivateKey_file(ctx, spec->key_file, SSL_FILETYPE_PEM) == 1 &&
                     SSL_CTX_check_private_key(ctx) == 1;
            }
        }
        break;
    }
    if (!ok) {
        ssl_err(err, errlen, what);
        tls_conf_clear(tc);
        return S2_ERR_INVALID;
    }
    return S2_OK;
oom:
    tls_conf_clear(tc);
    snprintf(err, errlen, "out of memory");
    return S2_ERR_INTERNAL;
}

/* The host part of a target's text ("host:port" or "[v6]:port") into buf; 0 if none fits. */
static int target_host(const char *target, char *buf, size_t len) {
    const char *start = target, *end;
    if (*target == '[') {
        start = target + 1;
        end = strchr(start, ']');
    } else {
        end = strrchr(target, ':');
    }
    if (!end || end <= start || (size_t)(end - start) >= len) return 0;
    memcpy(buf, start, (size_t)(end - start));
    buf[end - start] = '\0';
    return 1;
}

/* A certificate client with no configured server name checks the certificate against the
 * target it dialled, as the pure engine does: a CA shared by several gateways must not let
 * one answer for another's address. */
static int check_target_name(SSL *ssl, const char *target) {
    char host[256];
    if (!target || !target_host(target, host, sizeof host)) return 0;
    unsigned char raw[16];
    if (inet_pton(AF_INET, host, raw) == 1 || inet_pton(AF_INET6, host, raw) == 1)
        return X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host) == 1;
    return SSL_set_tlsext_host_name(ssl, host) == 1 && SSL_set1_host(ssl, host) == 1;
}

SSL *tls_new_ssl(struct tls_conf *tc, int fd, const char *target) {
    SSL *ssl = SSL_new(tc->ctx);
    if (!ssl) return NULL;
    if (tc->ktls) { /* OpenSSL hands the keys to a socket BIO only */
        if (!SSL_set_fd(ssl, fd)) goto fail;
        goto named;
    }
    if (!tls_set_bios(ssl, fd)) goto fail;
named:
    if (tc->role == S2_TLS_CLIENT && tc->server_name) {
        if (!SSL_set_tlsext_host_name(ssl, tc->server_name)) goto fail;
        if (tc->mode == S2_TLS_CERT && !SSL_set1_host(ssl, tc->server_name)) goto fail;
    } else if (tc->role == S2_TLS_CLIENT && tc->mode == S2_TLS_CERT) {
        if (!check_target_name(ssl, target)) goto fail;
    }
    return ssl;
fail:
    ERR_clear_error();
    SSL_free(ssl);
    return NULL;
}
