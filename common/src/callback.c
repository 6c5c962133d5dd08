/* callback_url checks and signatures. See callback.h. */
#include "promptq/callback.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>

#include "promptq/hash.h"

/* Splits an allow_hosts entry into its host part (length *hlen) and port (0 = any). Returns 0,
 * or -1 when malformed. */
static int pattern_split(const char *p, size_t *hlen, long *port)
{
    const char *colon, *h = p;
    size_t n;

    if (!strncmp(h, "*.", 2))
        h += 2;
    if (*h == '[') {
        const char *close = strchr(h, ']');

        if (!close || close == h + 1)
            return -1;
        for (const char *c = h + 1; c < close; c++)
            if (!isxdigit((unsigned char)*c) && *c != ':' && *c != '.')
                return -1;
        if (h != p) /* "*.[v6]" means nothing */
            return -1;
        colon = close[1] ? close + 1 : NULL;
        if (colon && *colon != ':')
            return -1;
    } else {
        colon = strchr(h, ':');
        n = colon ? (size_t)(colon - h) : strlen(h);
        if (n == 0 || h[0] == '.' || h[n - 1] == '.')
            return -1;
        for (size_t i = 0; i < n; i++) {
            unsigned char c = (unsigned char)h[i];

            if (!isalnum(c) && c != '-' && !(c == '.' && h[i + 1] != '.'))
                return -1;
        }
    }
    *port = 0;
    if (colon) {
        char *end;
        long v;

        if (!isdigit((unsigned char)colon[1]))
            return -1;
        v = strtol(colon + 1, &end, 10);
        if (*end || v < 1 || v > 65535)
            return -1;
        *port = v;
        *hlen = (size_t)(colon - p);
    } else {
        *hlen = strlen(p);
    }
    return 0;
}

int pq_callback_pattern_ok(const char *pattern)
{
    size_t hlen;
    long port;

    return pattern && pattern_split(pattern, &hlen, &port) == 0;
}

/* Host names and addresses only: what an allow_hosts entry can name. A host with anything else
 * (percent escapes, say) is refused rather than interpreted. */
static int host_chars_ok(const char *host)
{
    if (*host == '[')
        return 1; /* libcurl validated the address */
    if (!*host)
        return 0;
    for (const char *c = host; *c; c++)
        if (!isalnum((unsigned char)*c) && *c != '-' && *c != '.')
            return 0;
    return 1;
}

int pq_callback_host_allowed(char *const *patterns, size_t n, const char *host, long port)
{
    size_t len = strlen(host);

    if (!host_chars_ok(host))
        return 0;
    for (size_t i = 0; i < n; i++) {
        const char *p = patterns[i];
        size_t hlen;
        long pport;

        if (pattern_split(p, &hlen, &pport) || (pport && pport != port))
            continue;
        if (!strncmp(p, "*.", 2)) {
            /* the suffix with its dot: ".domain" */
            const char *suffix = p + 1;
            size_t slen = hlen - 1;

            if (len > slen && !strncasecmp(host + len - slen, suffix, slen))
                return 1;
        } else if (len == hlen && !strncasecmp(host, p, hlen)) {
            return 1;
        }
    }
    return 0;
}

const char *pq_callback_secret(const pq_conf_t *conf, const char *tenant)
{
    const char *any = NULL;

    for (size_t i = 0; i < conf->ncallback_secrets; i++) {
        if (!strcmp(conf->callback_secrets[i].key, tenant))
            return conf->callback_secrets[i].value;
        if (!strcmp(conf->callback_secrets[i].key, "*"))
            any = conf->callback_secrets[i].value;
    }
    return any;
}

int pq_callback_check(const pq_conf_t *conf, const char *tenant, const char *url, char *why,
                      size_t why_size)
{
    CURLU *u;
    CURLUcode rc;
    char *scheme = NULL, *host = NULL, *port = NULL, *user = NULL;
    int ret = -1;

    if (conf->ncallback_hosts == 0) {
        snprintf(why, why_size,
                 "callback_url: callbacks are not enabled (callbacks.allow_hosts "
                 "is empty)");
        return -1;
    }
    if (strlen(url) > PQ_CALLBACK_URL_MAX) {
        snprintf(why, why_size, "callback_url: longer than %d bytes", PQ_CALLBACK_URL_MAX);
        return -1;
    }
    if (!(u = curl_url())) {
        snprintf(why, why_size, "callback_url: out of memory");
        return -1;
    }
    rc = curl_url_set(u, CURLUPART_URL, url, 0);
    if (rc == CURLUE_OK)
        rc = curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
    if (rc == CURLUE_OK)
        rc = curl_url_get(u, CURLUPART_HOST, &host, 0);
    if (rc == CURLUE_OK)
        rc = curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT);
    if (rc != CURLUE_OK) {
        snprintf(why, why_size, "callback_url: not a valid URL");
        goto out;
    }
    if (strcasecmp(scheme, "http") != 0 && strcasecmp(scheme, "https") != 0) {
        snprintf(why, why_size, "callback_url: must be an http:// or https:// URL");
        goto out;
    }
    if (curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK) {
        snprintf(why, why_size, "callback_url: credentials in the URL are not allowed");
        goto out;
    }
    if (!pq_callback_host_allowed(conf->callback_hosts, conf->ncallback_hosts, host,
                                  strtol(port, NULL, 10))) {
        snprintf(why, why_size, "callback_url: host %.200s:%s is not on callbacks.allow_hosts",
                 host_chars_ok(host) ? host : "(invalid)", port);
        goto out;
    }
    if (!pq_callback_secret(conf, tenant)) {
        snprintf(why, why_size,
                 "callback_url: tenant %.100s has no callback secret (callbacks.secrets)", tenant);
        goto out;
    }
    ret = 0;
out:
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_free(user);
    curl_url_cleanup(u);
    return ret;
}

int pq_callback_sign(const char *secret, int64_t t, const char *body, size_t len, char *out,
                     size_t out_size)
{
    char head[32], mac[PQ_SHA256_HEX_LEN + 1];
    int n = snprintf(head, sizeof(head), "%" PRId64 ".", t);

    pq_hmac_sha256_hex2(secret, strlen(secret), head, (size_t)n, body, len, mac);
    if (!mac[0])
        return -1;
    snprintf(out, out_size, "t=%" PRId64 ",v1=%s", t, mac);
    return 0;
}
