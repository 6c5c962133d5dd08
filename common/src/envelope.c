/* Job envelope parsing and validation (DESIGN.md §3), job id generation and derivation.
 * The parser loads the document once and keeps borrowed pointers into the tree. */
#include "promptq/envelope.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/random.h>

#include "promptq/util.h"

const pq_envelope_limits_t pq_envelope_limits_default = {
    .max_bytes = 1024 * 1024,
    .max_prompt_bytes = 1024 * 1024,
    .max_messages = 2048,
};

#define ENV_REPLY_TO_MAX 256

/* Top-level keys an envelope may carry. "park" and "error" are added on the retry and dead
 * letter topics; everything else is in DESIGN.md §3. */
static const char *const env_keys[] = {
    "id",    "tenant", "request",      "metadata", "deadline",
    "cache", "park",   "callback_url", "reply_to", "error",
};

static void env_err(char *errstr, size_t errstr_size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void env_err(char *errstr, size_t errstr_size, const char *fmt, ...)
{
    va_list ap;
    if (!errstr || errstr_size == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errstr, errstr_size, fmt, ap);
    va_end(ap);
}

static int env_known_key(const char *key)
{
    for (size_t i = 0; i < sizeof(env_keys) / sizeof(env_keys[0]); i++)
        if (strcmp(key, env_keys[i]) == 0)
            return 1;
    return 0;
}

static int id_char(unsigned char c, int allow_colon)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-' || (allow_colon && c == ':');
}

static int charset_valid(const char *s, size_t max, int allow_colon)
{
    size_t n = 0;
    if (!s)
        return 0;
    for (; s[n]; n++) {
        if (n >= max || !id_char((unsigned char)s[n], allow_colon))
            return 0;
    }
    return n > 0;
}

/* "." and ".." match the charset but name no job: /v1/jobs/. and /v1/jobs/.. are the
 * collection and its parent to every URL normaliser between the client and the broker. */
static int id_dots(const char *id)
{
    return id && (!strcmp(id, ".") || !strcmp(id, ".."));
}

int pq_id_valid(const char *id)
{
    return charset_valid(id, PQ_ID_MAX, 1) && !id_dots(id);
}

int pq_tenant_valid(const char *tenant)
{
    return charset_valid(tenant, PQ_TENANT_MAX, 0);
}

/* jansson's messages that carry no input, matched as prefixes of its error text. */
static const char *const json_fixed_texts[] = {
    "invalid token",      "invalid escape",   "control character",   "invalid Unicode",
    "unexpected newline", "unexpected token", "'[' or '{' expected", "string or '}' expected",
    "':' expected",       "'}' expected",     "']' expected",        "maximum parsing depth",
};

const char *pq_json_error_what(const json_error_t *jerr)
{
    size_t i;

    /* jansson appends up to 20 bytes of the offending token (" near '...'"), and some texts
     * quote input themselves ("invalid Unicode '\\uD800'"): answer from fixed strings only. */
    for (i = 0; i < sizeof(json_fixed_texts) / sizeof(json_fixed_texts[0]); i++)
        if (strncmp(jerr->text, json_fixed_texts[i], strlen(json_fixed_texts[i])) == 0)
            return json_fixed_texts[i];
    switch (json_error_code(jerr)) {
    case json_error_out_of_memory:
        return "out of memory";
    case json_error_stack_overflow:
        return "nested too deeply";
    case json_error_invalid_utf8:
        return "invalid UTF-8";
    case json_error_premature_end_of_input:
        return "premature end of input";
    case json_error_end_of_input_expected:
        return "end of input expected";
    case json_error_invalid_syntax:
        return "invalid syntax";
    case json_error_null_character:
        return "\\u0000 is not allowed";
    case json_error_null_byte_in_key:
        return "NUL byte in object key";
    case json_error_duplicate_key:
        return "duplicate object key";
    case json_error_numeric_overflow:
        return "number out of range";
    default:
        return "malformed";
    }
}

/* Re-reads the borrowed pointers after root changed. Fields were validated by the parser. */
static void env_refresh(pq_envelope_t *env)
{
    json_t *v;

    env->id = json_string_value(json_object_get(env->root, "id"));
    v = json_object_get(env->root, "tenant");
    env->tenant = v ? json_string_value(v) : "default";
    env->request = json_object_get(env->root, "request");
    env->model = json_string_value(json_object_get(env->request, "model"));
    env->metadata = json_object_get(env->root, "metadata");
    env->callback_url = json_string_value(json_object_get(env->root, "callback_url"));
    env->reply_to = json_string_value(json_object_get(env->root, "reply_to"));
    env->park = json_object_get(env->root, "park");
}

/* Validates request.messages; adds the prompt bytes (string contents and content parts'
 * text) to *prompt. */
static pq_err_t env_check_messages(json_t *messages, const pq_envelope_limits_t *lim,
                                   size_t *prompt, char *errstr, size_t errstr_size)
{
    size_t n, i, j;
    json_t *msg, *content, *part, *text;

    if (!json_is_array(messages) || json_array_size(messages) == 0) {
        env_err(errstr, errstr_size, "request.messages: must be a non-empty array");
        return PQ_ERR_INVALID;
    }
    n = json_array_size(messages);
    if (lim->max_messages && n > lim->max_messages) {
        env_err(errstr, errstr_size,
                "request.messages: %zu messages, over the limit of %zu (max_messages)", n,
                lim->max_messages);
        return PQ_ERR_TOO_LARGE;
    }
    json_array_foreach(messages, i, msg)
    {
        if (!json_is_object(msg)) {
            env_err(errstr, errstr_size, "request.messages[%zu]: must be an object", i);
            return PQ_ERR_INVALID;
        }
        if (!json_is_string(json_object_get(msg, "role"))) {
            env_err(errstr, errstr_size, "request.messages[%zu].role: must be a string", i);
            return PQ_ERR_INVALID;
        }
        content = json_object_get(msg, "content");
        if (!content) {
            /* An assistant turn that only calls tools may omit content. */
            if (json_object_get(msg, "tool_calls") || json_object_get(msg, "function_call"))
                continue;
            env_err(errstr, errstr_size, "request.messages[%zu].content: required", i);
            return PQ_ERR_INVALID;
        }
        if (json_is_string(content)) {
            *prompt += json_string_length(content);
        } else if (json_is_array(content)) {
            json_array_foreach(content, j, part)
            {
                if (!json_is_object(part) || !json_is_string(json_object_get(part, "type"))) {
                    env_err(errstr, errstr_size,
                            "request.messages[%zu].content[%zu]: must be an object with a "
                            "string type",
                            i, j);
                    return PQ_ERR_INVALID;
                }
                text = json_object_get(part, "text");
                if (text && !json_is_string(text)) {
                    env_err(errstr, errstr_size,
                            "request.messages[%zu].content[%zu].text: must be a string", i, j);
                    return PQ_ERR_INVALID;
                }
                if (text)
                    *prompt += json_string_length(text);
            }
        } else if (!json_is_null(content)) {
            env_err(errstr, errstr_size,
                    "request.messages[%zu].content: must be a string, an array of content "
                    "parts or null",
                    i);
            return PQ_ERR_INVALID;
        }
    }
    if (lim->max_prompt_bytes && *prompt > lim->max_prompt_bytes) {
        env_err(errstr, errstr_size,
                "request.messages: prompt is %zu bytes, over the limit of %zu (max_prompt_bytes)",
                *prompt, lim->max_prompt_bytes);
        return PQ_ERR_TOO_LARGE;
    }
    return PQ_OK;
}

static pq_err_t env_check_request(json_t *req, const pq_envelope_limits_t *lim, char *errstr,
                                  size_t errstr_size)
{
    json_t *model;
    size_t prompt = 0;

    if (!req) {
        env_err(errstr, errstr_size, "request: required");
        return PQ_ERR_INVALID;
    }
    if (!json_is_object(req)) {
        env_err(errstr, errstr_size, "request: must be an object");
        return PQ_ERR_INVALID;
    }
    model = json_object_get(req, "model");
    if (!json_is_string(model) || json_string_length(model) == 0) {
        env_err(errstr, errstr_size, "request.model: must be a non-empty string");
        return PQ_ERR_INVALID;
    }
    return env_check_messages(json_object_get(req, "messages"), lim, &prompt, errstr, errstr_size);
}

static pq_err_t env_check_top(pq_envelope_t *env, const pq_envelope_limits_t *lim, char *errstr,
                              size_t errstr_size)
{
    json_t *root = env->root, *v;
    const char *key;
    pq_err_t err;

    json_object_foreach(root, key, v)
    {
        if (!env_known_key(key)) {
            env_err(errstr, errstr_size, "unknown field \"%.64s\"", key);
            return PQ_ERR_INVALID;
        }
    }
    if ((v = json_object_get(root, "id"))) {
        if (!json_is_string(v)) {
            env_err(errstr, errstr_size, "id: must be a string");
            return PQ_ERR_INVALID;
        }
        if (json_string_length(v) > PQ_ID_MAX) {
            env_err(errstr, errstr_size, "id: longer than %d characters", PQ_ID_MAX);
            return PQ_ERR_INVALID;
        }
        if (id_dots(json_string_value(v))) {
            env_err(errstr, errstr_size, "id: must not be \".\" or \"..\"");
            return PQ_ERR_INVALID;
        }
        if (!pq_id_valid(json_string_value(v)) ||
            strlen(json_string_value(v)) != json_string_length(v)) {
            env_err(errstr, errstr_size, "id: must match [A-Za-z0-9._:-]{1,%d}", PQ_ID_MAX);
            return PQ_ERR_INVALID;
        }
    }
    if ((v = json_object_get(root, "tenant"))) {
        if (!json_is_string(v) || !pq_tenant_valid(json_string_value(v)) ||
            strlen(json_string_value(v)) != json_string_length(v)) {
            env_err(errstr, errstr_size, "tenant: must match %s", PQ_TENANT_PATTERN);
            return PQ_ERR_INVALID;
        }
    }
    err = env_check_request(json_object_get(root, "request"), lim, errstr, errstr_size);
    if (err != PQ_OK)
        return err;
    if ((v = json_object_get(root, "metadata")) && !json_is_object(v)) {
        env_err(errstr, errstr_size, "metadata: must be an object");
        return PQ_ERR_INVALID;
    }
    if ((v = json_object_get(root, "deadline"))) {
        if (!json_is_string(v) || pq_time_parse(json_string_value(v), &env->deadline_ms) != 0) {
            env_err(errstr, errstr_size,
                    "deadline: must be an RFC 3339 time such as \"2026-01-02T03:04:05Z\"");
            return PQ_ERR_INVALID;
        }
        if (env->deadline_ms <= 0) {
            env_err(errstr, errstr_size, "deadline: must be after 1970-01-01T00:00:00Z");
            return PQ_ERR_INVALID;
        }
    }
    if ((v = json_object_get(root, "cache"))) {
        if (!json_is_boolean(v)) {
            env_err(errstr, errstr_size, "cache: must be a boolean");
            return PQ_ERR_INVALID;
        }
        env->cache = json_is_true(v) ? 1 : 0;
    }
    if ((v = json_object_get(root, "callback_url"))) {
        const char *s = json_string_value(v);
        if (!s || (strncmp(s, "http://", 7) != 0 && strncmp(s, "https://", 8) != 0) ||
            strlen(s) != json_string_length(v)) {
            env_err(errstr, errstr_size, "callback_url: must be an http:// or https:// URL");
            return PQ_ERR_INVALID;
        }
    }
    if ((v = json_object_get(root, "reply_to"))) {
        if (!json_is_string(v) || json_string_length(v) == 0 ||
            json_string_length(v) > ENV_REPLY_TO_MAX) {
            env_err(errstr, errstr_size, "reply_to: must be a string of 1 to %d bytes",
                    ENV_REPLY_TO_MAX);
            return PQ_ERR_INVALID;
        }
        if (lim->reply_prefix &&
            strncmp(json_string_value(v), lim->reply_prefix, strlen(lim->reply_prefix))) {
            /* the prefix is configuration, never input: safe to name */
            env_err(errstr, errstr_size, "reply_to: must be a promptq reply channel (%.64s...)",
                    lim->reply_prefix);
            return PQ_ERR_INVALID;
        }
    }
    if ((v = json_object_get(root, "park")) && !json_is_object(v)) {
        env_err(errstr, errstr_size, "park: must be an object");
        return PQ_ERR_INVALID;
    }
    if ((v = json_object_get(root, "error")) && !json_is_object(v)) {
        env_err(errstr, errstr_size, "error: must be an object");
        return PQ_ERR_INVALID;
    }
    return PQ_OK;
}

pq_err_t pq_envelope_parse(const char *buf, size_t len, const pq_envelope_limits_t *limits,
                           pq_envelope_t *out, char *errstr, size_t errstr_size)
{
    const pq_envelope_limits_t *lim = limits ? limits : &pq_envelope_limits_default;
    json_error_t jerr;
    json_t *root;
    pq_err_t err;

    memset(out, 0, sizeof(*out));
    out->cache = -1;
    if (errstr && errstr_size)
        errstr[0] = '\0';
    if (!buf) {
        env_err(errstr, errstr_size, "envelope: no data");
        err = PQ_ERR_INVALID;
        goto out_clear;
    }
    if (lim->max_bytes && len > lim->max_bytes) {
        env_err(errstr, errstr_size, "envelope: %zu bytes, over the limit of %zu (max_bytes)", len,
                lim->max_bytes);
        err = PQ_ERR_TOO_LARGE;
        goto out_clear;
    }
    root = json_loadb(buf, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (!root) {
        env_err(errstr, errstr_size, "invalid JSON: %s (line %d, column %d, position %d)",
                pq_json_error_what(&jerr), jerr.line, jerr.column, jerr.position);
        err = PQ_ERR_INVALID;
        goto out_clear;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        env_err(errstr, errstr_size, "envelope: must be a JSON object");
        err = PQ_ERR_INVALID;
        goto out_clear;
    }
    /* A bare chat-completions body becomes the envelope's request (also when it lacks model or
     * messages, so that the error names the missing field rather than an unknown one). */
    if (!json_object_get(root, "request") &&
        (json_object_get(root, "model") || json_object_get(root, "messages"))) {
        json_t *wrap = json_object();
        if (!wrap || json_object_set_new(wrap, "request", root) != 0) {
            json_decref(wrap);
            env_err(errstr, errstr_size, "envelope: out of memory");
            err = PQ_ERR_NOMEM;
            goto out_clear;
        }
        root = wrap;
    }
    out->root = root;
    err = env_check_top(out, lim, errstr, errstr_size);
    if (err != PQ_OK)
        goto out_clear;
    env_refresh(out);
    if (pq_request_hash(out->request, out->request_hash) != 0) {
        env_err(errstr, errstr_size, "request: cannot be serialised");
        err = PQ_ERR_INVALID;
        goto out_clear;
    }
    return PQ_OK;

out_clear:
    pq_envelope_clear(out);
    return err;
}

void pq_envelope_clear(pq_envelope_t *env)
{
    if (!env)
        return;
    json_decref(env->root);
    memset(env, 0, sizeof(*env));
    env->cache = -1;
}

static int env_set_string(pq_envelope_t *env, const char *key, const char *value)
{
    json_t *s;

    if (!env || !env->root || !value)
        return -1;
    s = json_string(value);
    if (!s || json_object_set_new(env->root, key, s) != 0)
        return -1;
    env_refresh(env);
    return 0;
}

int pq_envelope_set_id(pq_envelope_t *env, const char *id)
{
    if (!pq_id_valid(id))
        return -1;
    return env_set_string(env, "id", id);
}

int pq_envelope_set_reply_to(pq_envelope_t *env, const char *reply_to)
{
    size_t n;

    if (!reply_to)
        return -1;
    n = strlen(reply_to);
    if (n == 0 || n > ENV_REPLY_TO_MAX)
        return -1;
    return env_set_string(env, "reply_to", reply_to);
}

int pq_envelope_set_tenant(pq_envelope_t *env, const char *tenant)
{
    if (!pq_tenant_valid(tenant))
        return -1;
    return env_set_string(env, "tenant", tenant);
}

int pq_envelope_set_object(pq_envelope_t *env, const char *key, json_t *value)
{
    int rc = -1;

    if (!env || !env->root || !key || (strcmp(key, "park") != 0 && strcmp(key, "error") != 0))
        goto out_drop;
    if (!value) {
        json_object_del(env->root, key);
        env_refresh(env);
        return 0;
    }
    if (!json_is_object(value))
        goto out_drop;
    rc = json_object_set_new(env->root, key, value) == 0 ? 0 : -1;
    env_refresh(env);
    return rc;

out_drop:
    json_decref(value);
    return rc;
}

/* jansson escapes control characters inside strings, so JSON_COMPACT output is one line.
 * Dumped into a stack buffer first and copied into one allocation of the exact size (a larger
 * envelope is dumped again into that): json_dumps would grow its buffer by doubling and then
 * copy it, several allocations per job. */
char *pq_envelope_dump(const pq_envelope_t *env, size_t *len)
{
    char buf[4096], *s;
    size_t n;

    if (!env || !env->root)
        return NULL;
    n = json_dumpb(env->root, buf, sizeof(buf), JSON_COMPACT);
    if (n == 0 || !(s = malloc(n + 1)))
        return NULL;
    if (n <= sizeof(buf))
        memcpy(s, buf, n);
    else if (json_dumpb(env->root, s, n, JSON_COMPACT) != n) {
        free(s);
        return NULL;
    }
    s[n] = '\0';
    if (len)
        *len = n;
    return s;
}

/* ---- job ids ---------------------------------------------------------------------------- */

static const char crockford[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/* The last id handed out: 48-bit ms time and 80 bits of randomness (hi 16 bits, lo 64 bits).
 * A new millisecond draws fresh randomness; within the same millisecond (or if the clock went
 * back) the previous value is incremented, so ids are strictly increasing in this process. */
static struct {
    pthread_mutex_t lock;
    uint64_t ms;
    uint16_t rnd_hi;
    uint64_t rnd_lo;
    uint64_t fallback_ctr;
} id_state = {.lock = PTHREAD_MUTEX_INITIALIZER};

static pthread_once_t id_once = PTHREAD_ONCE_INIT;

static void id_atfork_prepare(void)
{
    pthread_mutex_lock(&id_state.lock);
}

static void id_atfork_parent(void)
{
    pthread_mutex_unlock(&id_state.lock);
}

/* A forked child must not continue the parent's sequence: force fresh randomness. */
static void id_atfork_child(void)
{
    id_state.ms = 0;
    pthread_mutex_unlock(&id_state.lock);
}

static void id_init(void)
{
    pthread_atfork(id_atfork_prepare, id_atfork_parent, id_atfork_child);
}

static void id_random(unsigned char *buf, size_t n)
{
    size_t got = 0;

    while (got < n) {
        ssize_t r = getrandom(buf + got, n - got, 0);
        if (r > 0) {
            got += (size_t)r;
        } else if (r < 0 && errno != EINTR) {
            break;
        }
    }
    if (got < n) {
        /* No getrandom: splitmix64 over the clock, pid and a counter. Unique, not secret. */
        struct timespec ts;
        uint64_t x;
        clock_gettime(CLOCK_REALTIME, &ts);
        x = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
        x ^= (uint64_t)getpid() << 32 ^ ++id_state.fallback_ctr;
        for (size_t i = got; i < n; i++) {
            uint64_t z = (x += 0x9E3779B97F4A7C15ull);
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            buf[i] = (unsigned char)(z ^ (z >> 31));
        }
    }
}

void pq_id_generate(char out[PQ_JOB_ID_LEN + 1])
{
    uint64_t ms, hi, lo;
    unsigned char rnd[10];
    char *p;
    int i;

    pthread_once(&id_once, id_init);
    ms = (uint64_t)pq_now_ms() & 0xFFFFFFFFFFFFull;

    pthread_mutex_lock(&id_state.lock);
    if (ms > id_state.ms) {
        id_random(rnd, sizeof(rnd));
        id_state.ms = ms;
        id_state.rnd_hi = (uint16_t)(rnd[0] << 8 | rnd[1]);
        id_state.rnd_lo = 0;
        for (i = 2; i < 10; i++)
            id_state.rnd_lo = id_state.rnd_lo << 8 | rnd[i];
    } else {
        /* Same millisecond or clock stepped back: continue from the last id. */
        if (++id_state.rnd_lo == 0 && ++id_state.rnd_hi == 0)
            id_state.ms++; /* 80-bit overflow: borrow the next millisecond */
    }
    ms = id_state.ms;
    hi = id_state.rnd_hi;
    lo = id_state.rnd_lo;
    pthread_mutex_unlock(&id_state.lock);

    /* 128 bits = ms(48) | rnd_hi(16) | rnd_lo(64), written as 26 base32 digits (130 bits, the
     * top two always zero), most significant first, so string order is numeric order. */
    {
        uint64_t top = ms << 16 | hi; /* upper 64 bits */
        memcpy(out, "job_", 4);
        p = out + 4;
        for (i = 25; i >= 0; i--) {
            unsigned bit = (unsigned)(i * 5); /* position of this digit's lowest bit */
            uint64_t v;
            if (bit >= 64) {
                v = top >> (bit - 64);
            } else if (bit + 5 <= 64) {
                v = lo >> bit;
            } else {
                v = lo >> bit | top << (64 - bit);
            }
            *p++ = crockford[v & 31];
        }
        *p = '\0';
    }
}

void pq_id_derive_kafka(const char *cluster_id, const char *topic, int32_t partition,
                        int64_t offset, int64_t timestamp_ms, char out[PQ_KAFKA_ID_LEN + 1])
{
    char stackbuf[512], *buf = stackbuf, hex[PQ_SHA256_HEX_LEN + 1];
    int n;

    if (!cluster_id)
        cluster_id = "";
    if (!topic)
        topic = "";
    n = snprintf(stackbuf, sizeof(stackbuf), "%s/%s/%" PRId32 "/%" PRId64 "/%" PRId64, cluster_id,
                 topic, partition, offset, timestamp_ms);
    if (n >= (int)sizeof(stackbuf)) {
        buf = malloc((size_t)n + 1);
        if (buf)
            snprintf(buf, (size_t)n + 1, "%s/%s/%" PRId32 "/%" PRId64 "/%" PRId64, cluster_id,
                     topic, partition, offset, timestamp_ms);
        else
            buf = stackbuf; /* truncated input: still deterministic */
    }
    pq_sha256_hex(buf, buf == stackbuf ? strlen(stackbuf) : (size_t)n, hex);
    if (buf != stackbuf)
        free(buf);
    memcpy(out, "kafka-", 6);
    memcpy(out + 6, hex, 24);
    out[30] = '\0';
}
