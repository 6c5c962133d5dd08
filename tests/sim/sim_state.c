/* The simulator's control state: parsed from POST /_sim/state bodies, served back as JSON. */
#include "sim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "promptq/util.h"

#define ERROR_BODY_MAX (1u << 20)
#define LATENCY_MAX_MS 3600000

static const char *const mode_names[] = {"ok", "down", "error", "rate_limit", "hang", "malformed"};

const char *pq_sim_mode_name(pq_sim_mode_t mode)
{
    if ((unsigned)mode < sizeof(mode_names) / sizeof(mode_names[0]))
        return mode_names[mode];
    return "?";
}

void pq_sim_state_init(pq_sim_state_t *st)
{
    memset(st, 0, sizeof(*st));
    st->mode = PQ_SIM_MODE_OK;
    st->status = 500;
    pq_strlcpy(st->retry_after, "1", sizeof(st->retry_after));
    st->retry_after_ms = -1;
}

void pq_sim_state_clear(pq_sim_state_t *st)
{
    if (!st)
        return;
    free(st->error_body);
    pq_sim_state_init(st);
}

/* Reads an integer field in [min, max]; a JSON null leaves *out alone. */
static int get_int(json_t *v, const char *name, int64_t min, int64_t max, int64_t *out,
                   char *errstr, size_t errstr_size)
{
    double d;

    if (json_is_null(v))
        return 0;
    if (json_is_integer(v)) {
        d = (double)json_integer_value(v);
    } else if (json_is_real(v) && floor(json_real_value(v)) == json_real_value(v)) {
        d = json_real_value(v);
    } else {
        snprintf(errstr, errstr_size, "%s: must be an integer", name);
        return -1;
    }
    if (d < (double)min || d > (double)max) {
        snprintf(errstr, errstr_size, "%s: must be between %lld and %lld", name, (long long)min,
                 (long long)max);
        return -1;
    }
    *out = (int64_t)d;
    return 0;
}

/* A valid Retry-After value: digits, or an HTTP date (printable ASCII, no control bytes). */
static int retry_after_ok(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n >= sizeof(((pq_sim_state_t *)0)->retry_after))
        return 0;
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e)
            return 0;
    return 1;
}

int pq_sim_state_parse(const char *buf, size_t len, pq_sim_state_t *out, char *errstr,
                       size_t errstr_size)
{
    json_error_t jerr;
    json_t *doc, *v;
    const char *key;
    int64_t n;
    int rc = -1;

    pq_sim_state_init(out);
    doc = json_loadb(buf, len, 0, &jerr);
    if (!doc) {
        snprintf(errstr, errstr_size, "body: invalid JSON: %s", jerr.text);
        return -1;
    }
    if (!json_is_object(doc)) {
        snprintf(errstr, errstr_size, "body: must be a JSON object");
        goto out_free_doc;
    }
    json_object_foreach(doc, key, v)
    {
        if (!strcmp(key, "mode")) {
            size_t i;
            const char *s = json_string_value(v);
            for (i = 0; s && i < sizeof(mode_names) / sizeof(mode_names[0]); i++)
                if (!strcmp(s, mode_names[i]))
                    break;
            if (!s || i == sizeof(mode_names) / sizeof(mode_names[0])) {
                snprintf(errstr, errstr_size,
                         "mode: must be one of ok, down, error, rate_limit, hang, malformed");
                goto out_clear;
            }
            out->mode = (pq_sim_mode_t)i;
        } else if (!strcmp(key, "status")) {
            n = out->status;
            if (get_int(v, "status", 100, 599, &n, errstr, errstr_size))
                goto out_clear;
            out->status = (int)n;
        } else if (!strcmp(key, "retry_after")) {
            if (json_is_null(v))
                continue;
            if (json_is_integer(v) && json_integer_value(v) >= 0) {
                snprintf(out->retry_after, sizeof(out->retry_after), "%lld",
                         (long long)json_integer_value(v));
            } else if (json_is_string(v) && retry_after_ok(json_string_value(v))) {
                pq_strlcpy(out->retry_after, json_string_value(v), sizeof(out->retry_after));
            } else {
                snprintf(errstr, errstr_size,
                         "retry_after: must be a string of seconds or an HTTP date");
                goto out_clear;
            }
            out->retry_after_set = 1;
        } else if (!strcmp(key, "retry_after_ms")) {
            if (get_int(v, "retry_after_ms", 0, INT32_MAX, &out->retry_after_ms, errstr,
                        errstr_size))
                goto out_clear;
        } else if (!strcmp(key, "latency_ms")) {
            if (get_int(v, "latency_ms", 0, LATENCY_MAX_MS, &out->latency_ms, errstr, errstr_size))
                goto out_clear;
        } else if (!strcmp(key, "failure_rate")) {
            if (json_is_null(v))
                continue;
            if (!json_is_number(v) || json_number_value(v) < 0.0 || json_number_value(v) > 1.0) {
                snprintf(errstr, errstr_size, "failure_rate: must be a number in [0, 1]");
                goto out_clear;
            }
            out->failure_rate = json_number_value(v);
        } else if (!strcmp(key, "revoke_tokens")) {
            if (!json_is_boolean(v)) {
                snprintf(errstr, errstr_size, "revoke_tokens: must be true or false");
                goto out_clear;
            }
            out->revoke_tokens = json_is_true(v);
        } else if (!strcmp(key, "error_body")) {
            if (json_is_null(v))
                continue;
            if (!json_is_string(v) || json_string_length(v) > ERROR_BODY_MAX) {
                snprintf(errstr, errstr_size, "error_body: must be a string of at most %u bytes",
                         ERROR_BODY_MAX);
                goto out_clear;
            }
            out->error_body = strdup(json_string_value(v));
            if (!out->error_body) {
                snprintf(errstr, errstr_size, "error_body: out of memory");
                goto out_clear;
            }
        } else {
            snprintf(errstr, errstr_size, "%.64s: unknown field", key);
            goto out_clear;
        }
    }
    rc = 0;
    goto out_free_doc;

out_clear:
    pq_sim_state_clear(out);
out_free_doc:
    json_decref(doc);
    return rc;
}

json_t *pq_sim_state_to_json(const pq_sim_state_t *st)
{
    return json_pack("{s:s, s:i, s:s, s:o, s:I, s:f, s:o}", "mode", pq_sim_mode_name(st->mode),
                     "status", st->status, "retry_after", st->retry_after, "retry_after_ms",
                     st->retry_after_ms >= 0 ? json_integer(st->retry_after_ms) : json_null(),
                     "latency_ms", (json_int_t)st->latency_ms, "failure_rate", st->failure_rate,
                     "error_body", st->error_body ? json_string(st->error_body) : json_null());
}
