/* SHA-256 and HMAC-SHA256 through OpenSSL 3's EVP interfaces (no deprecated calls), and the
 * canonical request hash. The digest and MAC algorithms are fetched once per process. */
#include "promptq/hash.h"

#include <pthread.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>

static pthread_once_t hash_once = PTHREAD_ONCE_INIT;
static EVP_MD *hash_sha256;
static EVP_MAC *hash_hmac;

static void hash_init(void)
{
    hash_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    hash_hmac = EVP_MAC_fetch(NULL, "HMAC", NULL);
}

static void hash_hex(const unsigned char *md, size_t n, char *out)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 0xf];
    }
    out[2 * n] = '\0';
}

/* On an OpenSSL failure (out of memory) the output is the empty string: it never equals a
 * real digest, so comparisons fail closed. */
void pq_sha256_hex(const void *data, size_t len, char out[PQ_SHA256_HEX_LEN + 1])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    pthread_once(&hash_once, hash_init);
    out[0] = '\0';
    if (!hash_sha256 || !EVP_Digest(data, len, md, &mdlen, hash_sha256, NULL) || mdlen != 32)
        return;
    hash_hex(md, mdlen, out);
}

void pq_hmac_sha256_hex(const void *key, size_t keylen, const void *msg, size_t msglen,
                        char out[PQ_SHA256_HEX_LEN + 1])
{
    pq_hmac_sha256_hex2(key, keylen, NULL, 0, msg, msglen, out);
}

void pq_hmac_sha256_hex2(const void *key, size_t keylen, const void *head, size_t headlen,
                         const void *msg, size_t msglen, char out[PQ_SHA256_HEX_LEN + 1])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    size_t mdlen = 0;
    EVP_MAC_CTX *ctx;
    OSSL_PARAM params[2];
    static const unsigned char empty_key[1];

    pthread_once(&hash_once, hash_init);
    out[0] = '\0';
    if (!hash_hmac)
        return;
    ctx = EVP_MAC_CTX_new(hash_hmac);
    if (!ctx)
        return;
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();
    /* EVP_MAC_init treats a NULL key as "keep the previous key"; an empty key is valid HMAC. */
    if (!key)
        key = empty_key;
    if (EVP_MAC_init(ctx, key, keylen, params) &&
        (headlen == 0 || EVP_MAC_update(ctx, head, headlen)) && EVP_MAC_update(ctx, msg, msglen) &&
        EVP_MAC_final(ctx, md, &mdlen, sizeof(md)) && mdlen == 32)
        hash_hex(md, mdlen, out);
    EVP_MAC_CTX_free(ctx);
}

static int hash_feed(const char *buffer, size_t size, void *data)
{
    return EVP_DigestUpdate((EVP_MD_CTX *)data, buffer, size) ? 0 : -1;
}

/* Streams jansson's canonical dump straight into the digest: no copy of the request text. */
int pq_request_cache_hash(const json_t *request, const char *request_hash,
                          char out[PQ_SHA256_HEX_LEN + 1])
{
    json_t *copy;
    int rc;

    if (!json_object_get(request, "stream") && !json_object_get(request, "stream_options")) {
        memcpy(out, request_hash, PQ_SHA256_HEX_LEN + 1);
        return request_hash[0] ? 0 : -1;
    }
    if (!(copy = json_copy((json_t *)request))) /* shallow: members shared, not copied */
        return -1;
    json_object_del(copy, "stream");
    json_object_del(copy, "stream_options");
    rc = pq_request_hash(copy, out);
    json_decref(copy);
    return rc;
}

int pq_request_hash(const json_t *request, char out[PQ_SHA256_HEX_LEN + 1])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    EVP_MD_CTX *ctx;
    int rc = -1;

    pthread_once(&hash_once, hash_init);
    out[0] = '\0';
    if (!request || !hash_sha256)
        return -1;
    ctx = EVP_MD_CTX_new();
    if (!ctx)
        return -1;
    if (!EVP_DigestInit_ex(ctx, hash_sha256, NULL))
        goto out_free_ctx;
    if (json_dump_callback(request, hash_feed, ctx,
                           JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY) != 0)
        goto out_free_ctx;
    if (!EVP_DigestFinal_ex(ctx, md, &mdlen) || mdlen != 32)
        goto out_free_ctx;
    hash_hex(md, mdlen, out);
    rc = 0;
out_free_ctx:
    EVP_MD_CTX_free(ctx);
    return rc;
}
