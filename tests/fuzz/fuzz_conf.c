/* libFuzzer target for the config loader (common/src/conf.c): the file an operator writes, the
 * first thing every program reads. Whatever it holds, pq_conf_load_str either refuses it with a
 * terminated message that says why, or returns a config that --check-config's warnings walk and
 * that frees cleanly. A refusal never quotes a secret of the file (G6: it goes to logs): no
 * provider key ("api_key", "api_keys"), client key (the names of broker.api_keys) or password
 * of the input appears in the message, unless those bytes are also somewhere else in the file
 * (a provider named like a key may be quoted). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "promptq/conf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *input;
static size_t input_len;

/* Aborts when errstr holds s while the input holds s only once (in its secret place: as the
 * name of a provider, say, it could be quoted rightly). Short strings match by chance (under
 * 12 bytes: real keys are longer), and a secret made of [a-z_.] only could be a config path's own
 * words. */
static void not_in(const char *errstr, const char *s)
{
    size_t n = s ? strlen(s) : 0, count = 0;
    const char *p = input, *end = input + input_len, *hit;

    if (n < 12 || strspn(s, "abcdefghijklmnopqrstuvwxyz_.") == n || !strstr(errstr, s))
        return;
    while (p < end && (hit = memmem(p, (size_t)(end - p), s, n))) {
        count++;
        p = hit + 1;
    }
    if (count == 1)
        abort();
}

/* Provider keys and passwords: string values (or list elements) of "api_key", "api_keys",
 * "password" anywhere. */
static void check_values(const char *errstr, json_t *v, int secret)
{
    const char *k;
    json_t *x;
    size_t i;

    if (secret && json_is_string(v))
        not_in(errstr, json_string_value(v));
    if (json_is_object(v) && secret) {
        return; /* broker.api_keys {client key: tenant}: the tenants are no secret */
    } else if (json_is_object(v)) {
        json_object_foreach(v, k, x)
        {
            check_values(errstr, x,
                         strcmp(k, "api_key") == 0 || strcmp(k, "api_keys") == 0 ||
                             strcmp(k, "password") == 0);
        }
    } else if (json_is_array(v)) {
        json_array_foreach(v, i, x) check_values(errstr, x, secret);
    }
}

static void check_secrets(const char *errstr, json_t *doc)
{
    json_t *clients = json_object_get(json_object_get(doc, "broker"), "api_keys");
    const char *k;
    json_t *x;

    check_values(errstr, doc, 0);
    json_object_foreach(clients, k, x) not_in(errstr, k); /* client keys: the map's names */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static FILE *devnull;
    char errstr[512];
    pq_conf_t *c;

    if (!devnull && !(devnull = fopen("/dev/null", "w")))
        abort();
    errstr[0] = '\0';
    c = pq_conf_load_str((const char *)data, size, errstr, sizeof(errstr));
    if (strnlen(errstr, sizeof(errstr)) == sizeof(errstr))
        abort();
    if (c) {
        pq_conf_warn(c, devnull, "fuzz");
        pq_conf_destroy(c);
    } else if (!errstr[0]) {
        abort(); /* a refusal says why */
    } else {
        json_t *doc = json_loadb((const char *)data, size, JSON_ALLOW_NUL, NULL);
        input = (const char *)data;
        input_len = size;
        check_secrets(errstr, doc);
        json_decref(doc);
    }
    return 0;
}
