/* The simulator's control state: parsed from POST /_sim/state bodies, served back as JSON. */
#include "sim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "promptq/util.h"

#define ERROR_BODY_MAX (1u << 20)
#define LATENCY_MAX_MS 3600000

static const char *const mode_names[] = {"ok",   "down",      "error", "rate_limit",
                                         "hang", "malformed", "reset", "stall"};

#define NMODES            (sizeof(mode_names) / sizeof(mode_names[0]))
#define ERROR_CODE_MAX    128
#define ERROR_MESSAGE_MAX 4096

/* Where in the control body a state object sits: what it may hold. */
typedef enum { LEVEL_TOP = 0, LEVEL_MODEL, LEVEL_SCHED } level_t;

const char *pq_sim_mode_name(pq_sim_mode_t mode)
{
    if ((unsigned)mode < NMODES)
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
    free(st->error_code);
    free(st->error_message);
    if (st->sched_down) {
        pq_sim_state_clear(st->sched_down);
        free(st->sched_down);
    }
    for (size_t i = 0; i < st->nmodels; i++) {
        free(st->models[i].name);
        pq_sim_state_clear(&st->models[i].state);
    }
    free(st->models);
    pq_sim_state_init(st);
}

const pq_sim_state_t *pq_sim_state_pick(const pq_sim_state_t *top, const char *model,
                                        int64_t elapsed_ms)
{
    const pq_sim_state_t *st = top;

    if (model && *model) {
        for (size_t i = 0; i < top->nmodels; i++) {
            if (!strcmp(top->models[i].name, model)) {
                st = &top->models[i].state;
                break;
            }
        }
    }
    if (st->sched_down && st->period_ms > 0 && elapsed_ms >= 0 &&
        elapsed_ms % st->period_ms < st->down_ms)
        st = st->sched_down;
    return st;
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

/* A string field of at most max bytes, printable; null leaves *out NULL. */
static int get_text(json_t *v, const char *path, const char *name, size_t max, char **out,
                    char *errstr, size_t errstr_size)
{
    if (json_is_null(v))
        return 0;
    if (!json_is_string(v) || json_string_length(v) == 0 || json_string_length(v) > max ||
        strlen(json_string_value(v)) != json_string_length(v)) {
        snprintf(errstr, errstr_size, "%s%s: must be a non-empty string of at most %zu bytes", path,
                 name, max);
        return -1;
    }
    free(*out);
    *out = strdup(json_string_value(v));
    if (!*out) {
        snprintf(errstr, errstr_size, "%s%s: out of memory", path, name);
        return -1;
    }
    return 0;
}

static int parse_object(json_t *doc, level_t level, const char *path, pq_sim_state_t *out,
                        char *errstr, size_t errstr_size);

/* "schedule": {"period_ms", "down_ms", "down": {state}} */
static int parse_schedule(json_t *v, const char *path, pq_sim_state_t *out, char *errstr,
                          size_t errstr_size)
{
    char sub[384];
    json_t *period = json_object_get(v, "period_ms"), *down_ms = json_object_get(v, "down_ms");
    json_t *down = json_object_get(v, "down");
    const char *key;
    json_t *f;

    if (!json_is_object(v)) {
        snprintf(errstr, errstr_size, "%sschedule: must be an object", path);
        return -1;
    }
    json_object_foreach(v, key, f)
    {
        if (strcmp(key, "period_ms") && strcmp(key, "down_ms") && strcmp(key, "down")) {
            snprintf(errstr, errstr_size, "%sschedule.%.64s: unknown field", path, key);
            return -1;
        }
    }
    snprintf(sub, sizeof(sub), "%sschedule.", path);
    if (!period || !down_ms || !json_is_object(down)) {
        snprintf(errstr, errstr_size, "%sschedule: needs period_ms, down_ms and a down object",
                 path);
        return -1;
    }
    if (get_int(period, "period_ms", 1, LATENCY_MAX_MS, &out->period_ms, errstr, errstr_size) ||
        (out->period_ms <= 0 &&
         snprintf(errstr, errstr_size, "period_ms: must be an integer of at least 1") > 0) ||
        get_int(down_ms, "down_ms", 0, out->period_ms, &out->down_ms, errstr, errstr_size)) {
        /* name the path: get_int wrote the bare field name */
        char tmp[256];
        pq_strlcpy(tmp, errstr, sizeof(tmp));
        snprintf(errstr, errstr_size, "%s%s", sub, tmp);
        return -1;
    }
    out->sched_down = malloc(sizeof(*out->sched_down));
    if (!out->sched_down) {
        snprintf(errstr, errstr_size, "%sdown: out of memory", sub);
        return -1;
    }
    pq_strlcpy(sub + strlen(sub), "down.", sizeof(sub) - strlen(sub));
    return parse_object(down, LEVEL_SCHED, sub, out->sched_down, errstr, errstr_size);
}

/* "models": {"name": {state}, ...} */
static int parse_models(json_t *v, pq_sim_state_t *out, char *errstr, size_t errstr_size)
{
    char sub[384];
    const char *name;
    json_t *m;

    if (!json_is_object(v) || json_object_size(v) > PQ_SIM_MAX_MODEL_STATES) {
        snprintf(errstr, errstr_size, "models: must be an object of at most %d models",
                 PQ_SIM_MAX_MODEL_STATES);
        return -1;
    }
    out->models = calloc(json_object_size(v) ? json_object_size(v) : 1, sizeof(*out->models));
    if (!out->models) {
        snprintf(errstr, errstr_size, "models: out of memory");
        return -1;
    }
    json_object_foreach(v, name, m)
    {
        pq_sim_model_state_t *ms = &out->models[out->nmodels];
        size_t n = strlen(name);

        snprintf(sub, sizeof(sub), "models.%.200s.", name);
        if (n == 0 || n > PQ_SIM_MODEL_MAX) {
            snprintf(errstr, errstr_size, "models: a model name must have 1 to %d bytes",
                     PQ_SIM_MODEL_MAX);
            return -1;
        }
        if (!json_is_object(m)) {
            snprintf(errstr, errstr_size, "models.%.200s: must be an object", name);
            return -1;
        }
        pq_sim_state_init(&ms->state);
        ms->name = strdup(name);
        out->nmodels++; /* from here on pq_sim_state_clear frees it */
        if (!ms->name) {
            snprintf(errstr, errstr_size, "models: out of memory");
            return -1;
        }
        if (parse_object(m, LEVEL_MODEL, sub, &ms->state, errstr, errstr_size))
            return -1;
    }
    return 0;
}

/* Fills out (initialised) from the fields of doc; path prefixes field names in errors. */
static int parse_object(json_t *doc, level_t level, const char *path, pq_sim_state_t *out,
                        char *errstr, size_t errstr_size)
{
    json_t *v;
    const char *key;
    int64_t n;

    pq_sim_state_init(out);
    json_object_foreach(doc, key, v)
    {
        if (!strcmp(key, "mode")) {
            size_t i;
            const char *s = json_string_value(v);
            for (i = 0; s && i < NMODES; i++)
                if (!strcmp(s, mode_names[i]))
                    break;
            if (!s || i == NMODES) {
                snprintf(errstr, errstr_size,
                         "%smode: must be one of ok, down, error, rate_limit, hang, malformed, "
                         "reset, stall",
                         path);
                return -1;
            }
            if (i == PQ_SIM_MODE_DOWN && level != LEVEL_TOP) {
                snprintf(errstr, errstr_size,
                         "%smode: \"down\" closes the listener for all calls; only the "
                         "top-level mode may be down",
                         path);
                return -1;
            }
            out->mode = (pq_sim_mode_t)i;
        } else if (!strcmp(key, "status")) {
            n = out->status;
            if (get_int(v, "status", 100, 599, &n, errstr, errstr_size))
                goto out_path;
            out->status = (int)n;
        } else if (!strcmp(key, "retry_after")) {
            if (json_is_null(v) || (json_is_string(v) && !*json_string_value(v))) {
                out->retry_after_none = 1; /* no Retry-After header at all */
                out->retry_after[0] = '\0';
                continue;
            }
            if (json_is_integer(v) && json_integer_value(v) >= 0) {
                snprintf(out->retry_after, sizeof(out->retry_after), "%lld",
                         (long long)json_integer_value(v));
            } else if (json_is_string(v) && retry_after_ok(json_string_value(v))) {
                pq_strlcpy(out->retry_after, json_string_value(v), sizeof(out->retry_after));
            } else {
                snprintf(errstr, errstr_size,
                         "%sretry_after: must be a string of seconds or an HTTP date, or null",
                         path);
                return -1;
            }
            out->retry_after_set = 1;
        } else if (!strcmp(key, "retry_after_ms")) {
            if (get_int(v, "retry_after_ms", 0, INT32_MAX, &out->retry_after_ms, errstr,
                        errstr_size))
                goto out_path;
        } else if (!strcmp(key, "latency_ms")) {
            if (get_int(v, "latency_ms", 0, LATENCY_MAX_MS, &out->latency_ms, errstr, errstr_size))
                goto out_path;
        } else if (!strcmp(key, "chunk_ms")) {
            if (get_int(v, "chunk_ms", 0, LATENCY_MAX_MS, &out->chunk_ms, errstr, errstr_size))
                goto out_path;
        } else if (!strcmp(key, "stream_cut_after")) {
            if (get_int(v, "stream_cut_after", 0, INT32_MAX, &out->stream_cut_after, errstr,
                        errstr_size))
                goto out_path;
        } else if (!strcmp(key, "stream_malformed_at")) {
            if (get_int(v, "stream_malformed_at", 0, INT32_MAX, &out->stream_malformed_at, errstr,
                        errstr_size))
                goto out_path;
        } else if (!strcmp(key, "reject_prefill")) {
            if (!json_is_boolean(v)) {
                snprintf(errstr, errstr_size, "%sreject_prefill: must be true or false", path);
                return -1;
            }
            out->reject_prefill = json_is_true(v);
        } else if (!strcmp(key, "stream_no_done")) {
            if (!json_is_boolean(v)) {
                snprintf(errstr, errstr_size, "%sstream_no_done: must be true or false", path);
                return -1;
            }
            out->stream_no_done = json_is_true(v);
        } else if (!strcmp(key, "failure_rate")) {
            if (json_is_null(v))
                continue;
            if (!json_is_number(v) || json_number_value(v) < 0.0 || json_number_value(v) > 1.0) {
                snprintf(errstr, errstr_size, "%sfailure_rate: must be a number in [0, 1]", path);
                return -1;
            }
            out->failure_rate = json_number_value(v);
        } else if (!strcmp(key, "revoke_tokens") && level == LEVEL_TOP) {
            if (!json_is_boolean(v)) {
                snprintf(errstr, errstr_size, "revoke_tokens: must be true or false");
                return -1;
            }
            out->revoke_tokens = json_is_true(v);
        } else if (!strcmp(key, "error_body")) {
            if (json_is_null(v))
                continue;
            if (!json_is_string(v) || json_string_length(v) > ERROR_BODY_MAX) {
                snprintf(errstr, errstr_size, "%serror_body: must be a string of at most %u bytes",
                         path, ERROR_BODY_MAX);
                return -1;
            }
            out->error_body = strdup(json_string_value(v));
            if (!out->error_body) {
                snprintf(errstr, errstr_size, "%serror_body: out of memory", path);
                return -1;
            }
        } else if (!strcmp(key, "error_code")) {
            if (get_text(v, path, "error_code", ERROR_CODE_MAX, &out->error_code, errstr,
                         errstr_size))
                return -1;
        } else if (!strcmp(key, "error_message")) {
            if (get_text(v, path, "error_message", ERROR_MESSAGE_MAX, &out->error_message, errstr,
                         errstr_size))
                return -1;
        } else if (!strcmp(key, "schedule") && level != LEVEL_SCHED) {
            if (json_is_null(v))
                continue;
            if (parse_schedule(v, path, out, errstr, errstr_size))
                return -1;
        } else if (!strcmp(key, "models") && level == LEVEL_TOP) {
            if (json_is_null(v))
                continue;
            if (parse_models(v, out, errstr, errstr_size))
                return -1;
        } else if (!strcmp(key, "revoke_tokens") || !strcmp(key, "models") ||
                   !strcmp(key, "schedule")) {
            snprintf(errstr, errstr_size, "%s%s: not allowed here (top level only%s)", path, key,
                     strcmp(key, "schedule") ? "" : " or per model");
            return -1;
        } else {
            snprintf(errstr, errstr_size, "%s%.64s: unknown field", path, key);
            return -1;
        }
    }
    return 0;

out_path:
    /* get_int names the bare field: prefix its path */
    if (*path) {
        char tmp[256];
        pq_strlcpy(tmp, errstr, sizeof(tmp));
        snprintf(errstr, errstr_size, "%s%s", path, tmp);
    }
    return -1;
}

int pq_sim_state_parse(const char *buf, size_t len, pq_sim_state_t *out, char *errstr,
                       size_t errstr_size)
{
    json_error_t jerr;
    json_t *doc;
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
    if (parse_object(doc, LEVEL_TOP, "", out, errstr, errstr_size)) {
        pq_sim_state_clear(out);
        goto out_free_doc;
    }
    rc = 0;

out_free_doc:
    json_decref(doc);
    return rc;
}

static json_t *state_json(const pq_sim_state_t *st)
{
    json_t *doc = json_pack(
        "{s:s, s:i, s:o, s:o, s:I, s:f, s:o, s:o, s:o}", "mode", pq_sim_mode_name(st->mode),
        "status", st->status, "retry_after",
        st->retry_after_none ? json_null() : json_string(st->retry_after), "retry_after_ms",
        st->retry_after_ms >= 0 ? json_integer(st->retry_after_ms) : json_null(), "latency_ms",
        (json_int_t)st->latency_ms, "failure_rate", st->failure_rate, "error_body",
        st->error_body ? json_string(st->error_body) : json_null(), "error_code",
        st->error_code ? json_string(st->error_code) : json_null(), "error_message",
        st->error_message ? json_string(st->error_message) : json_null());

    if (doc)
        json_object_update_new(doc,
                               json_pack("{s:I, s:I, s:I, s:b, s:b}", "chunk_ms",
                                         (json_int_t)st->chunk_ms, "stream_cut_after",
                                         (json_int_t)st->stream_cut_after, "stream_malformed_at",
                                         (json_int_t)st->stream_malformed_at, "stream_no_done",
                                         st->stream_no_done, "reject_prefill", st->reject_prefill));
    if (doc && st->sched_down)
        json_object_set_new(doc, "schedule",
                            json_pack("{s:I, s:I, s:o}", "period_ms", (json_int_t)st->period_ms,
                                      "down_ms", (json_int_t)st->down_ms, "down",
                                      state_json(st->sched_down)));
    return doc;
}

json_t *pq_sim_state_to_json(const pq_sim_state_t *st)
{
    json_t *doc = state_json(st), *models;

    if (!doc || !st->nmodels)
        return doc;
    models = json_object();
    for (size_t i = 0; i < st->nmodels; i++)
        json_object_set_new(models, st->models[i].name, state_json(&st->models[i].state));
    json_object_set_new(doc, "models", models);
    return doc;
}
