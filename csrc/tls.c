/* TLS contexts for a route's TLS leg: psk (TLS 1.3 external PSK), compat
 * (SciStream 1.x stunnel: TLS 1.2 PSK) and cert (certificate + pinned CA). */
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define TLS13_SUITES "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
#define COMPAT_CIPHERS \
    "ECDHE-PSK-AES128-CBC-SHA256:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-NULL-SHA256"
/* The PSK session's suite: SHA-256, so that stunnel 5.68 accepts the PSK. */
static const unsigned char PSK_SUITE_ID[2] = {0x13, 0x01}; /* TLS_AES_128_GCM_SHA256 */

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
    if (md && md != SSL_CIPHER_get_handshake_digest(SSL_SESSION_get0_cipher(s))) {
        /* The server picked a suite whose hash does not fit this PSK. */
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

int tls_conf_build(struct tls_conf *tc, const s2_route_spec *spec, char *err, size_t errlen) {
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
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
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
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, 128 * 1024);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx, 0);
    int ok = 1;
    const char *what = "TLS setup";
    switch (spec->tls_mode) {
    case S2_TLS_PSK:
        ok = SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) &&
             SSL_CTX_set_ciphersuites(ctx, ciphers ? ciphers : TLS13_SUITES);
        what = "the TLS 1.3 cipher suites";
        if (server)
            SSL_CTX_set_psk_find_session_callback(ctx, psk_find_session);
        else
            SSL_CTX_set_psk_use_session_callback(ctx, psk_use_session);
        break;
    case S2_TLS_COMPAT: {
        /* PSK suites only; aNULL is removed for good even if the caller asks.
         * SECLEVEL=0 lets PSK-NULL-SHA256 (what a 1.x `ciphers = eNULL` peer has) through. */
        char list[1024];
        snprintf(list, sizeof list, "%s:!aNULL:@SECLEVEL=0", ciphers ? ciphers : COMPAT_CIPHERS);
        ok = SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) &&
             SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION) && SSL_CTX_set_cipher_list(ctx, list);
        what = "the TLS 1.2 PSK cipher list";
        if (server)
            SSL_CTX_set_psk_server_callback(ctx, compat_server_cb);
        else
            SSL_CTX_set_psk_client_callback(ctx, compat_client_cb);
        break;
    }
    case S2_TLS_CERT:
        ok = SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) &&
             SSL_CTX_set_ciphersuites(ctx, ciphers ? ciphers : TLS13_SUITES);
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

SSL *tls_new_ssl(struct tls_conf *tc, int fd) {
    SSL *ssl = SSL_new(tc->ctx);
    if (!ssl) return NULL;
    if (!SSL_set_fd(ssl, fd)) goto fail;
    if (tc->role == S2_TLS_CLIENT && tc->server_name) {
        if (!SSL_set_tlsext_host_name(ssl, tc->server_name)) goto fail;
        if (tc->mode == S2_TLS_CERT && !SSL_set1_host(ssl, tc->server_name)) goto fail;
    }
    return ssl;
fail:
    ERR_clear_error();
    SSL_free(ssl);
    return NULL;
}
