/* libFuzzer target for the callback URL check (common/src/callback.c, pq_callback_check): a
 * client's callback_url against an allow-list. Whatever the bytes: an accepted URL is http(s),
 * has no credentials, and the host libcurl reads from it (the one a callback would reach) is on
 * the list, on the listed port; a refusal names why in printable ASCII (never the URL's raw
 * bytes). */
#include <ctype.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>

#include "promptq/callback.h"
#include "promptq/conf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int host_listed(const char *host, long port)
{
    size_t n = strlen(host), s = strlen(".example.com");

    if (n > s && !strcasecmp(host + n - s, ".example.com"))
        return 1;
    if (!strcasecmp(host, "hooks.acme.io") && port == 8443)
        return 1;
    return !strcmp(host, "127.0.0.1");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char *hosts[] = {"*.example.com", "hooks.acme.io:8443", "127.0.0.1"};
    static pq_kv_t secrets[] = {{"*", "s3cret"}};
    pq_conf_t conf;
    char why[256], *url, *host = NULL, *port = NULL, *scheme = NULL, *user = NULL;
    CURLU *u;

    if (size > PQ_CALLBACK_URL_MAX + 16 || !(url = malloc(size + 1)))
        return 0;
    memcpy(url, data, size);
    url[size] = '\0';
    memset(&conf, 0, sizeof(conf));
    conf.callback_hosts = hosts;
    conf.ncallback_hosts = 3;
    conf.callback_secrets = secrets;
    conf.ncallback_secrets = 1;
    why[0] = '\0';
    if (pq_callback_check(&conf, "t", url, why, sizeof(why)) != 0) {
        if (!why[0])
            abort();
        for (const char *c = why; *c; c++)
            if (!isprint((unsigned char)*c))
                abort();
        free(url);
        return 0;
    }
    /* accepted: what libcurl makes of it must be allowed */
    if (!(u = curl_url()) || curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK)
        abort();
    if (strcasecmp(scheme, "http") && strcasecmp(scheme, "https"))
        abort();
    if (curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK)
        abort();
    if (!host_listed(host, strtol(port, NULL, 10)))
        abort();
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    free(url);
    return 0;
}
