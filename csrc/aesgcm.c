/* AES-GCM for the TLS 1.3 leg from Intel's intel-ipsec-mb library, handed to
 * OpenSSL as a provider, so that OpenSSL keeps doing all of TLS (handshake,
 * record layer, key updates, alerts) and only the bulk cipher changes.
 *
 * Why: the Debian OpenSSL (3.0) has no AES-GCM for CPUs with VAES and
 * VPCLMULQDQ (AVX-512 AES and carry-less multiply, Ice Lake and later); on
 * them ipsec-mb seals a 16 KiB record about 2.8 times faster (17 against 6 GB/s
 * per core here), and AES-GCM was a third of each TLS gateway side's CPU.
 * On other CPUs ipsec-mb is no faster than OpenSSL, so S2_AES_GCM_AUTO keeps
 * OpenSSL there.
 *
 * How: the provider lives in a library context of our own (with OpenSSL's
 * default provider for everything else); a TLS 1.3 SSL_CTX made in it with the
 * property query "?provider=scistream-aesgcm" prefers our AES-128/256-GCM. The
 * rest of the process (Python's ssl module included) never sees it. The
 * implementation serves what OpenSSL 3's TLS 1.3 record layer asks of a cipher:
 * per record an init with a 12-byte nonce, the tag (to open), the 5-byte
 * record header as AAD, one or more updates, final, the tag (sealed). It is not
 * registered for TLS 1.2 contexts, whose GCM goes through OpenSSL's "TLS AAD"
 * controls this provider does not implement (it refuses them). */
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define PROVIDER_NAME "scistream-aesgcm"
#define PROVIDER_PROPQ "?provider=" PROVIDER_NAME

#ifdef SCISTREAM_HAVE_IPSEC_MB
#define LINUX 1 /* the header aligns struct gcm_key_data to 64 bytes only with this */
#include <intel-ipsec-mb.h>

#define GCM_IV_LEN 12
#define GCM_TAG_LEN 16
#define GCM_AAD_MAX 64 /* TLS 1.3 gives 5 bytes (the record header) */

/* The library's functions for one key size on this CPU, taken from its manager by
 * setup (written once, then only read); [1] seals, [0] opens. */
struct gcm_ops {
    size_t key_len;
    aes_gcm_pre_t pre;
    aes_gcm_init_t init;
    aes_gcm_enc_dec_update_t update[2];
    aes_gcm_enc_dec_finalize_t finalize[2];
};
static struct gcm_ops gcm128_ops = {.key_len = 16}, gcm256_ops = {.key_len = 32};

struct gcm_ctx {
    struct gcm_key_data key; /* first: 64-byte aligned, as the library needs */
    struct gcm_context_data state;
    const struct gcm_ops *ops; /* fixed by the algorithm */
    int encrypting;
    int key_set, iv_set, started, tag_sealed, tag_given;
    unsigned char iv[GCM_IV_LEN];
    unsigned char aad[GCM_AAD_MAX];
    size_t aad_len;
    unsigned char tag[GCM_TAG_LEN];
};

static void *gcm_new(const struct gcm_ops *ops) {
    void *mem = NULL;
    if (posix_memalign(&mem, 64, sizeof(struct gcm_ctx)) != 0) return NULL;
    struct gcm_ctx *c = mem;
    memset(c, 0, sizeof *c);
    c->ops = ops;
    return c;
}

static void *gcm128_new(void *provctx) {
    (void)provctx;
    return gcm_new(&gcm128_ops);
}

static void *gcm256_new(void *provctx) {
    (void)provctx;
    return gcm_new(&gcm256_ops);
}

static void gcm_free(void *vc) {
    if (!vc) return;
    OPENSSL_cleanse(vc, sizeof(struct gcm_ctx)); /* expanded keys */
    free(vc);
}

static void *gcm_dup(void *vc) {
    const struct gcm_ctx *src = vc;
    struct gcm_ctx *c = gcm_new(src->ops);
    if (c) memcpy(c, src, sizeof *c);
    return c;
}

/* Forget the message under way: a new one needs a fresh nonce (a sealed nonce is never reused). */
static void gcm_reset_message(struct gcm_ctx *c) {
    c->iv_set = c->started = c->tag_sealed = c->tag_given = 0;
    c->aad_len = 0;
}

static int gcm_set_ctx_params(void *vc, const OSSL_PARAM params[]) {
    struct gcm_ctx *c = vc;
    if (!params) return 1;
    for (const OSSL_PARAM *p = params; p->key; p++) {
        if (strcmp(p->key, OSSL_CIPHER_PARAM_AEAD_TAG) == 0) {
            /* Only the tag to check when opening, always full length. */
            if (c->encrypting || p->data_type != OSSL_PARAM_OCTET_STRING || p->data_size != GCM_TAG_LEN ||
                !p->data)
                return 0;
            memcpy(c->tag, p->data, GCM_TAG_LEN);
            c->tag_given = 1;
        } else if (strcmp(p->key, OSSL_CIPHER_PARAM_AEAD_IVLEN) == 0) {
            size_t n;
            if (!OSSL_PARAM_get_size_t(p, &n) || n != GCM_IV_LEN) return 0;
        } else if (strcmp(p->key, OSSL_CIPHER_PARAM_KEYLEN) == 0) {
            size_t n;
            if (!OSSL_PARAM_get_size_t(p, &n) || n != c->ops->key_len) return 0;
        } else if (strcmp(p->key, OSSL_CIPHER_PARAM_AEAD_TLS1_AAD) == 0 ||
                   strcmp(p->key, OSSL_CIPHER_PARAM_AEAD_TLS1_IV_FIXED) == 0 ||
                   strcmp(p->key, OSSL_CIPHER_PARAM_AEAD_TLS1_SET_IV_INV) == 0 ||
                   strcmp(p->key, OSSL_CIPHER_PARAM_AEAD_TAGLEN) == 0) {
            return 0; /* TLS 1.2 record modes and short tags: not offered */
        }
    }
    return 1;
}

static int gcm_init(void *vc, const unsigned char *key, size_t key_len, const unsigned char *iv, size_t iv_len,
                    const OSSL_PARAM params[], int encrypting) {
    struct gcm_ctx *c = vc;
    c->encrypting = encrypting;
    gcm_reset_message(c);
    if (key) {
        if (key_len != c->ops->key_len) return 0;
        c->ops->pre(key, &c->key);
        c->key_set = 1;
    }
    if (iv) {
        if (iv_len != GCM_IV_LEN) return 0;
        memcpy(c->iv, iv, GCM_IV_LEN);
        c->iv_set = 1;
    }
    return gcm_set_ctx_params(c, params);
}

static int gcm_einit(void *vc, const unsigned char *key, size_t key_len, const unsigned char *iv, size_t iv_len,
                     const OSSL_PARAM params[]) {
    return gcm_init(vc, key, key_len, iv, iv_len, params, 1);
}

static int gcm_dinit(void *vc, const unsigned char *key, size_t key_len, const unsigned char *iv, size_t iv_len,
                     const OSSL_PARAM params[]) {
    return gcm_init(vc, key, key_len, iv, iv_len, params, 0);
}

/* The first byte of the message: the AAD is complete, the library starts. */
static int gcm_start(struct gcm_ctx *c) {
    if (c->started) return 1;
    if (!c->key_set || !c->iv_set) return 0;
    c->ops->init(&c->key, &c->state, c->iv, c->aad, c->aad_len);
    c->started = 1;
    return 1;
}

static int gcm_update(void *vc, unsigned char *out, size_t *outl, size_t outsize, const unsigned char *in,
                      size_t inl) {
    struct gcm_ctx *c = vc;
    *outl = 0;
    if (inl && !in) return 0;
    if (!out) { /* AAD: all of it comes before the first byte of text */
        if (c->started || c->tag_sealed || inl > GCM_AAD_MAX - c->aad_len) return 0;
        if (inl) memcpy(c->aad + c->aad_len, in, inl);
        c->aad_len += inl;
        *outl = inl;
        return 1;
    }
    if (outsize < inl || c->tag_sealed || !gcm_start(c)) return 0;
    if (inl == 0) return 1;
    c->ops->update[c->encrypting](&c->key, &c->state, out, in, inl);
    *outl = inl;
    return 1;
}

/* Seal: compute the tag (read back through the AEAD_TAG parameter). Open: check
 * the given tag in constant time; a message without one fails. */
static int gcm_final(void *vc, unsigned char *out, size_t *outl, size_t outsize) {
    (void)out;
    (void)outsize;
    struct gcm_ctx *c = vc;
    *outl = 0;
    if (c->tag_sealed || !gcm_start(c)) return 0;
    int ok;
    if (c->encrypting) {
        c->ops->finalize[1](&c->key, &c->state, c->tag, GCM_TAG_LEN);
        ok = 1;
    } else {
        unsigned char computed[GCM_TAG_LEN];
        c->ops->finalize[0](&c->key, &c->state, computed, GCM_TAG_LEN);
        ok = c->tag_given && CRYPTO_memcmp(computed, c->tag, GCM_TAG_LEN) == 0;
        OPENSSL_cleanse(computed, sizeof computed);
    }
    int sealed = c->encrypting;
    gcm_reset_message(c);
    c->tag_sealed = sealed;
    return ok;
}

static int set_size(OSSL_PARAM params[], const char *key, size_t v) {
    OSSL_PARAM *p = OSSL_PARAM_locate(params, key);
    return !p || OSSL_PARAM_set_size_t(p, v);
}

static int set_int(OSSL_PARAM params[], const char *key, int v) {
    OSSL_PARAM *p = OSSL_PARAM_locate(params, key);
    return !p || OSSL_PARAM_set_int(p, v);
}

static int gcm_get_params(OSSL_PARAM params[], size_t key_len) {
    OSSL_PARAM *mode = OSSL_PARAM_locate(params, OSSL_CIPHER_PARAM_MODE);
    return (!mode || OSSL_PARAM_set_uint(mode, EVP_CIPH_GCM_MODE)) &&
           set_size(params, OSSL_CIPHER_PARAM_KEYLEN, key_len) &&
           set_size(params, OSSL_CIPHER_PARAM_IVLEN, GCM_IV_LEN) &&
           set_size(params, OSSL_CIPHER_PARAM_BLOCK_SIZE, 1) && set_int(params, OSSL_CIPHER_PARAM_AEAD, 1) &&
           set_int(params, OSSL_CIPHER_PARAM_CUSTOM_IV, 1) && set_int(params, OSSL_CIPHER_PARAM_CTS, 0) &&
           set_int(params, OSSL_CIPHER_PARAM_TLS1_MULTIBLOCK, 0) &&
           set_int(params, OSSL_CIPHER_PARAM_HAS_RAND_KEY, 0);
}

static int gcm128_get_params(OSSL_PARAM params[]) { return gcm_get_params(params, 16); }
static int gcm256_get_params(OSSL_PARAM params[]) { return gcm_get_params(params, 32); }

static int gcm_get_ctx_params(void *vc, OSSL_PARAM params[]) {
    struct gcm_ctx *c = vc;
    if (!set_size(params, OSSL_CIPHER_PARAM_KEYLEN, c->ops->key_len) ||
        !set_size(params, OSSL_CIPHER_PARAM_IVLEN, GCM_IV_LEN) ||
        !set_size(params, OSSL_CIPHER_PARAM_AEAD_TAGLEN, GCM_TAG_LEN))
        return 0;
    OSSL_PARAM *p = OSSL_PARAM_locate(params, OSSL_CIPHER_PARAM_AEAD_TAG);
    if (p) { /* the tag of the message just sealed, in full */
        if (!c->encrypting || !c->tag_sealed || p->data_size != GCM_TAG_LEN ||
            !OSSL_PARAM_set_octet_string(p, c->tag, GCM_TAG_LEN))
            return 0;
    }
    return 1;
}

static const OSSL_PARAM gcm_gettable[] = {
    OSSL_PARAM_uint(OSSL_CIPHER_PARAM_MODE, NULL),
    OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_KEYLEN, NULL),
    OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_IVLEN, NULL),
    OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_BLOCK_SIZE, NULL),
    OSSL_PARAM_int(OSSL_CIPHER_PARAM_AEAD, NULL),
    OSSL_PARAM_int(OSSL_CIPHER_PARAM_CUSTOM_IV, NULL),
    OSSL_PARAM_int(OSSL_CIPHER_PARAM_CTS, NULL),
    OSSL_PARAM_int(OSSL_CIPHER_PARAM_TLS1_MULTIBLOCK, NULL),
    OSSL_PARAM_int(OSSL_CIPHER_PARAM_HAS_RAND_KEY, NULL),
    OSSL_PARAM_END,
};

static const OSSL_PARAM gcm_ctx_gettable[] = {
    OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_KEYLEN, NULL),
    OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_IVLEN, NULL),
    OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_AEAD_TAGLEN, NULL),
    OSSL_PARAM_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM gcm_ctx_settable[] = {
    OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_KEYLEN, NULL),
    OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_AEAD_IVLEN, NULL),
    OSSL_PARAM_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *gcm_gettable_params(void *provctx) {
    (void)provctx;
    return gcm_gettable;
}

static const OSSL_PARAM *gcm_gettable_ctx_params(void *vc, void *provctx) {
    (void)vc;
    (void)provctx;
    return gcm_ctx_gettable;
}

static const OSSL_PARAM *gcm_settable_ctx_params(void *vc, void *provctx) {
    (void)vc;
    (void)provctx;
    return gcm_ctx_settable;
}

#define FN(id, f) {id, (void (*)(void))(f)}
#define GCM_DISPATCH(bits)                                                                                   \
    static const OSSL_DISPATCH gcm##bits##_functions[] = {                                                 \
        FN(OSSL_FUNC_CIPHER_NEWCTX, gcm##bits##_new),                                                      \
        FN(OSSL_FUNC_CIPHER_FREECTX, gcm_free),                                                            \
        FN(OSSL_FUNC_CIPHER_DUPCTX, gcm_dup),                                                              \
        FN(OSSL_FUNC_CIPHER_ENCRYPT_INIT, gcm_einit),                                                      \
        FN(OSSL_FUNC_CIPHER_DECRYPT_INIT, gcm_dinit),                                                      \
        FN(OSSL_FUNC_CIPHER_UPDATE, gcm_update),                                                           \
        FN(OSSL_FUNC_CIPHER_FINAL, gcm_final),                                                             \
        FN(OSSL_FUNC_CIPHER_GET_PARAMS, gcm##bits##_get_params),                                           \
        FN(OSSL_FUNC_CIPHER_GET_CTX_PARAMS, gcm_get_ctx_params),                                           \
        FN(OSSL_FUNC_CIPHER_SET_CTX_PARAMS, gcm_set_ctx_params),                                           \
        FN(OSSL_FUNC_CIPHER_GETTABLE_PARAMS, gcm_gettable_params),                                         \
        FN(OSSL_FUNC_CIPHER_GETTABLE_CTX_PARAMS, gcm_gettable_ctx_params),                                 \
        FN(OSSL_FUNC_CIPHER_SETTABLE_CTX_PARAMS, gcm_settable_ctx_params),                                 \
        {0, NULL},                                                                                         \
    }
GCM_DISPATCH(128);
GCM_DISPATCH(256);

static const OSSL_ALGORITHM provider_ciphers[] = {
    {"AES-128-GCM:id-aes128-GCM:2.16.840.1.101.3.4.1.6", "provider=" PROVIDER_NAME, gcm128_functions,
     "AES-128-GCM by intel-ipsec-mb"},
    {"AES-256-GCM:id-aes256-GCM:2.16.840.1.101.3.4.1.46", "provider=" PROVIDER_NAME, gcm256_functions,
     "AES-256-GCM by intel-ipsec-mb"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM *provider_query(void *provctx, int operation_id, int *no_cache) {
    (void)provctx;
    *no_cache = 0;
    return operation_id == OSSL_OP_CIPHER ? provider_ciphers : NULL;
}

static const OSSL_DISPATCH provider_functions[] = {
    FN(OSSL_FUNC_PROVIDER_QUERY_OPERATION, provider_query),
    {0, NULL},
};

static int provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in, const OSSL_DISPATCH **out,
                         void **provctx) {
    (void)in;
    *out = provider_functions;
    *provctx = (void *)handle;
    return 1;
}
#endif /* SCISTREAM_HAVE_IPSEC_MB */

/* ---- choosing the implementation ------------------------------------------- */

static pthread_once_t setup_once = PTHREAD_ONCE_INIT;
static OSSL_LIB_CTX *fast_libctx;         /* default provider + ours, or NULL */
static char fast_unusable[160] = "";      /* why ipsec-mb is not used, when it is not */
static char openssl_because[200] = "";    /* "OpenSSL: <fast_unusable>", what auto falls back to */

static void setup(void) {
#ifdef SCISTREAM_HAVE_IPSEC_MB
    IMB_MGR *m = alloc_mb_mgr(0);
    if (!m) {
        snprintf(fast_unusable, sizeof fast_unusable, "intel-ipsec-mb could not allocate its manager");
        return;
    }
    IMB_ARCH arch = IMB_ARCH_NONE;
    init_mb_mgr_auto(m, &arch);
    const uint64_t vaes = IMB_FEATURE_VAES | IMB_FEATURE_VPCLMULQDQ;
    if (imb_get_errno(m) != 0 || arch != IMB_ARCH_AVX512 || (m->features & vaes) != vaes) {
        snprintf(fast_unusable, sizeof fast_unusable,
                 "this CPU lacks AVX-512 with VAES and VPCLMULQDQ, where intel-ipsec-mb beats OpenSSL");
        free_mb_mgr(m);
        return;
    }
    gcm128_ops.pre = m->gcm128_pre;
    gcm128_ops.init = m->gcm128_init;
    gcm128_ops.update[0] = m->gcm128_dec_update;
    gcm128_ops.update[1] = m->gcm128_enc_update;
    gcm128_ops.finalize[0] = m->gcm128_dec_finalize;
    gcm128_ops.finalize[1] = m->gcm128_enc_finalize;
    gcm256_ops.pre = m->gcm256_pre;
    gcm256_ops.init = m->gcm256_init;
    gcm256_ops.update[0] = m->gcm256_dec_update;
    gcm256_ops.update[1] = m->gcm256_enc_update;
    gcm256_ops.finalize[0] = m->gcm256_dec_finalize;
    gcm256_ops.finalize[1] = m->gcm256_enc_finalize;
    free_mb_mgr(m); /* the functions are the library's code, not the manager's */
    OSSL_LIB_CTX *lc = OSSL_LIB_CTX_new();
    if (!lc || !OSSL_PROVIDER_add_builtin(lc, PROVIDER_NAME, provider_init) ||
        !OSSL_PROVIDER_load(lc, "default") || !OSSL_PROVIDER_load(lc, PROVIDER_NAME)) {
        snprintf(fast_unusable, sizeof fast_unusable, "OpenSSL did not load the intel-ipsec-mb provider");
        OSSL_LIB_CTX_free(lc); /* unloads what it loaded */
        ERR_clear_error();
        return;
    }
    fast_libctx = lc;
#else
    snprintf(fast_unusable, sizeof fast_unusable, "this build has no intel-ipsec-mb (libipsec-mb-dev)");
#endif
}

static void setup_and_explain(void) {
    setup();
    if (!fast_libctx) snprintf(openssl_because, sizeof openssl_because, "OpenSSL: %s", fast_unusable);
}

int aesgcm_choose(int choice, struct aesgcm_choice *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    out->name = "OpenSSL";
    if (choice == S2_AES_GCM_OPENSSL) return S2_OK;
    if (choice != S2_AES_GCM_AUTO && choice != S2_AES_GCM_IPSEC_MB) {
        snprintf(err, errlen, "unknown AES-GCM implementation %d", choice);
        return S2_ERR_INVALID;
    }
    pthread_once(&setup_once, setup_and_explain);
    if (!fast_libctx) {
        if (choice == S2_AES_GCM_AUTO) {
            out->name = openssl_because;
            return S2_OK;
        }
        snprintf(err, errlen, "AES-GCM by intel-ipsec-mb was asked for, but %s", fast_unusable);
        return S2_ERR_INVALID;
    }
    out->libctx = fast_libctx;
    out->propq = PROVIDER_PROPQ;
    out->name = "intel-ipsec-mb (VAES, AVX-512)";
    return S2_OK;
}
