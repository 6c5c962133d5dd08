/* Configuration loader (DESIGN.md §6): each section is a table of properties {name, type,
 * default, min, max, description, offset}; one setter validates a JSON value against its
 * property and stores it. Errors name the JSON path ("worker.max_inflight: must be between 1
 * and 1000000") and never contain secret values. No globals: pq_conf_load is reentrant. */
#include "promptq/conf.h"

#include <errno.h>
#include <stdarg.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "promptq/callback.h"
#include "promptq/envelope.h"
#include "promptq/kafka.h"
#include "promptq/log.h"
#include "promptq/util.h"

#define CONF_MAX_FILE   (16 * 1024 * 1024) /* config file size cap */
#define CONF_MAX_STR    (64 * 1024)        /* any string value, after ${VAR} expansion */
#define CONF_MAX_LIST   1024               /* api_keys, headers, targets per route */
#define CONF_PATH_MAX   320                /* JSON paths in error messages */
#define KAFKA_TOPIC_MAX 249

#define DEFAULT_BOOTSTRAP "127.0.0.1:9092"
#define DEFAULT_IAM_URL   "https://iam.cloud.ibm.com/identity/token"

/* ---- errors ---------------------------------------------------------------------------- */

typedef struct {
    char *buf;
    size_t size;
} cerr_t;

static int fail(cerr_t *e, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Writes "<path>: <message>" (or just the message when path is empty); returns -1. */
static int fail(cerr_t *e, const char *path, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    if (!e->buf || !e->size)
        return -1;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (path && *path)
        snprintf(e->buf, e->size, "%s: %s", path, msg);
    else
        snprintf(e->buf, e->size, "%s", msg);
    return -1;
}

/* Path building truncates silently: a long path in an error message is cut, never overflows. */
static void path_fmt(char *buf, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void path_fmt(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, size, fmt, ap);
    va_end(ap);
}

static void path_key(char *buf, size_t size, const char *parent, const char *key)
{
    if (parent && *parent)
        path_fmt(buf, size, "%s.%s", parent, key);
    else
        path_fmt(buf, size, "%s", key);
}

static void path_index(char *buf, size_t size, const char *parent, size_t i)
{
    path_fmt(buf, size, "%s.%zu", parent, i);
}

/* ---- ${VAR} expansion ------------------------------------------------------------------ */

typedef struct {
    char *p;
    size_t len, cap;
} sbuf_t;

static int sb_add(sbuf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > CONF_MAX_STR)
        return -1;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        char *p;

        while (cap < b->len + n + 1)
            cap *= 2;
        if (!(p = realloc(b->p, cap)))
            return -1;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

static int is_var_char(char c, int first)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_' ||
           (!first && c >= '0' && c <= '9');
}

/* Expands "${VAR}" from the environment ("$${" is a literal "${"). Returns a new string, or
 * NULL with an error naming path and variable (never its value). */
static char *env_expand(const char *s, const char *path, cerr_t *e)
{
    sbuf_t b = {0};

    if (sb_add(&b, "", 0))
        goto out_nomem;
    while (*s) {
        if (s[0] == '$' && s[1] == '$' && s[2] == '{') {
            if (sb_add(&b, "${", 2))
                goto out_toolong;
            s += 3;
        } else if (s[0] == '$' && s[1] == '{') {
            const char *name = s + 2, *end = strchr(name, '}');
            char var[128];
            const char *val;
            size_t n;

            if (!end) {
                fail(e, path, "unterminated \"${\" (write \"$${\" for a literal \"${\")");
                goto out_free;
            }
            n = (size_t)(end - name);
            for (size_t i = 0; i < n; i++)
                if (!is_var_char(name[i], i == 0))
                    n = 0;
            if (n == 0 || n >= sizeof(var)) {
                fail(e, path, "bad variable name in \"${...}\"");
                goto out_free;
            }
            memcpy(var, name, n);
            var[n] = '\0';
            if (!(val = getenv(var))) {
                fail(e, path, "environment variable %s is not set", var);
                goto out_free;
            }
            if (sb_add(&b, val, strlen(val)))
                goto out_toolong;
            s = end + 1;
        } else {
            if (sb_add(&b, s, 1))
                goto out_toolong;
            s++;
        }
    }
    return b.p;

out_toolong:
    fail(e, path, "longer than %d bytes after expanding variables", CONF_MAX_STR);
    goto out_free;
out_nomem:
    fail(e, path, "out of memory");
out_free:
    free(b.p);
    return NULL;
}

/* The one map whose keys are secrets (client API keys): paths into it name the entry's
 * position, never its key (G6: these messages are logged). */
#define SECRET_KEYS_PATH "broker.api_keys"

/* Expands ${VAR} in every string value of the tree, in place. Object keys are left alone
 * (broker.api_keys expands its keys itself). */
static int expand_tree(json_t *j, const char *path, cerr_t *e)
{
    char sub[CONF_PATH_MAX];
    size_t n = 0;

    if (json_is_string(j)) {
        const char *s = json_string_value(j);
        char *x;
        int rc;

        if (!strchr(s, '$'))
            return 0;
        if (!(x = env_expand(s, path, e)))
            return -1;
        rc = json_string_set(j, x);
        free(x);
        return rc ? fail(e, path, "out of memory") : 0;
    }
    if (json_is_object(j)) {
        const char *key;
        json_t *v;

        json_object_foreach(j, key, v)
        {
            n++;
            if (strcmp(path, SECRET_KEYS_PATH) == 0)
                path_fmt(sub, sizeof(sub), "%s (entry %zu)", path, n);
            else
                path_key(sub, sizeof(sub), path, key);
            if (expand_tree(v, sub, e))
                return -1;
        }
    } else if (json_is_array(j)) {
        size_t i;
        json_t *v;

        json_array_foreach(j, i, v)
        {
            path_index(sub, sizeof(sub), path, i);
            if (expand_tree(v, sub, e))
                return -1;
        }
    }
    return 0;
}

/* ---- property tables -------------------------------------------------------------------- */

typedef enum {
    PT_INT,     /* int */
    PT_I64,     /* int64_t */
    PT_BOOL,    /* int, JSON true/false */
    PT_DBL,     /* double */
    PT_STR,     /* char * */
    PT_ENUM,    /* char *, one of enums */
    PT_STRLIST, /* char ** + size_t count at cnt_off */
    PT_STR1,    /* a single string stored as a one-element list (api_key) */
    PT_KVMAP,   /* pq_kv_t * + size_t count at cnt_off: object of strings */
} ptype_t;

#define PF_REQUIRED    0x01u /* must be present */
#define PF_NONEMPTY    0x02u /* string: not ""; list: at least one element */
#define PF_SECRET_KEYS 0x04u /* KVMAP whose keys are secrets: ${VAR} in keys, never echoed */
#define PF_HEADERS     0x08u /* KVMAP of HTTP headers: token names, values without CR/LF */
#define PF_TENANTS     0x10u /* KVMAP values / STRLIST elements are tenants (pq_tenant_valid) */

typedef struct {
    const char *name;
    ptype_t type;
    unsigned flags;
    size_t off, cnt_off;
    int64_t idef, imin, imax;
    double ddef, dmin, dmax;
    const char *sdef;  /* STR/ENUM default, or NULL */
    const char *enums; /* ENUM: allowed values separated by '|' */
    const char *desc;
} prop_t;

#define P_INT(S, N, F, D, LO, HI, DESC)                                                            \
    {                                                                                              \
        .name = N, .type = PT_INT, .off = offsetof(S, F), .idef = D, .imin = LO, .imax = HI,       \
        .desc = DESC                                                                               \
    }
#define P_I64(S, N, F, D, LO, HI, DESC)                                                            \
    {                                                                                              \
        .name = N, .type = PT_I64, .off = offsetof(S, F), .idef = D, .imin = LO, .imax = HI,       \
        .desc = DESC                                                                               \
    }
#define P_BOOL(S, N, F, D, DESC)                                                                   \
    {                                                                                              \
        .name = N, .type = PT_BOOL, .off = offsetof(S, F), .idef = D, .imin = 0, .imax = 1,        \
        .desc = DESC                                                                               \
    }
#define P_DBL(S, N, F, D, LO, HI, DESC)                                                            \
    {                                                                                              \
        .name = N, .type = PT_DBL, .off = offsetof(S, F), .ddef = D, .dmin = LO, .dmax = HI,       \
        .desc = DESC                                                                               \
    }
#define P_STR(S, N, F, D, FL, DESC)                                                                \
    {                                                                                              \
        .name = N, .type = PT_STR, .flags = FL, .off = offsetof(S, F), .sdef = D, .desc = DESC     \
    }
#define P_ENUM(S, N, F, D, E, FL, DESC)                                                            \
    {                                                                                              \
        .name = N, .type = PT_ENUM, .flags = FL, .off = offsetof(S, F), .sdef = D, .enums = E,     \
        .desc = DESC                                                                               \
    }
#define P_LIST(T, S, N, F, C, FL, DESC)                                                            \
    {                                                                                              \
        .name = N, .type = T, .flags = FL, .off = offsetof(S, F), .cnt_off = offsetof(S, C),       \
        .desc = DESC                                                                               \
    }

#define I32MAX      2147483647
#define TEN_YEARS_S 315360000
#define ONE_HOUR_MS 3600000
#define GIB         (1024LL * 1024 * 1024)

static const prop_t topics_props[] = {
    P_STR(pq_conf_t, "prefix", topic_prefix, "promptq.", 0, "prefix of every topic name"),
    P_INT(pq_conf_t, "partitions", topic_partitions, 4, 1, 10000,
          "partitions of the topics promptq creates"),
};

static const prop_t redis_props[] = {
    P_STR(pq_conf_t, "url", redis_url, "redis://127.0.0.1:6379/0", PF_NONEMPTY,
          "redis://[:password@]host[:port][/db]; PROMPTQ_REDIS_URL overrides"),
    P_STR(pq_conf_t, "prefix", redis_prefix, "promptq:", 0, "prefix of every Redis key"),
    P_I64(pq_conf_t, "result_ttl_s", result_ttl_s, 604800, 1, TEN_YEARS_S, "TTL of job records"),
};

static const prop_t cache_props[] = {
    P_I64(pq_conf_t, "ttl_s", cache_ttl_s, 86400, 1, TEN_YEARS_S, "TTL of cached responses"),
    P_BOOL(pq_conf_t, "temperature_zero", cache_temperature_zero, 0,
           "cache temperature-0 requests unless the job says otherwise"),
};

static const prop_t broker_props[] = {
    P_STR(pq_conf_t, "listen", listen, "127.0.0.1:8080", PF_NONEMPTY, "HTTP listen HOST:PORT"),
    P_INT(pq_conf_t, "threads", broker_threads, 2, 1, 256, "HTTP threads (event loops)"),
    P_STR(pq_conf_t, "spool_dir", spool_dir, "./spool", PF_NONEMPTY,
          "local spool for jobs Kafka did not confirm in time; created if missing"),
    P_I64(pq_conf_t, "spool_max_bytes", spool_max_bytes, GIB, 1024 * 1024, 1LL << 50,
          "spool size cap"),
    P_LIST(PT_KVMAP, pq_conf_t, "api_keys", api_keys, napi_keys, PF_SECRET_KEYS | PF_TENANTS,
           "client key -> tenant (" PQ_TENANT_PATTERN "); empty: the broker runs open"),
    P_LIST(PT_STRLIST, pq_conf_t, "admin_tenants", admin_tenants, nadmin_tenants, PF_TENANTS,
           "tenants whose keys may ask for requests that affect every tenant (POST "
           "/v1/parked/{route}/replay); open brokers allow them to all"),
    P_INT(pq_conf_t, "sync_timeout_ms", sync_timeout_ms, 50000, 1, ONE_HOUR_MS,
          "how long POST /v1/chat/completions waits for the result"),
    P_INT(pq_conf_t, "ack_timeout_ms", ack_timeout_ms, 1000, 1, 600000,
          "wait for the Kafka delivery report before spooling"),
    P_I64(pq_conf_t, "max_body_bytes", max_body_bytes, 0, 0, GIB,
          "largest HTTP body; 0 = derived from message.max.bytes"),
    P_INT(pq_conf_t, "max_prompt_bytes", max_prompt_bytes, 1024 * 1024, 1, 1 << 30,
          "largest request object of a job"),
    P_INT(pq_conf_t, "backlog", backlog, 4096, 1, 65535, "listen backlog"),
    P_STR(pq_conf_t, "instance_id", instance_id, NULL, PF_NONEMPTY,
          "names the reply channel; default <hostname>-<pid>"),
    P_I64(pq_conf_t, "idempotency_ttl_s", idempotency_ttl_s, 86400, 1, TEN_YEARS_S,
          "how long an Idempotency-Key maps to its job"),
    P_DBL(pq_conf_t, "tenant_rps", tenant_rps, 0, 0, 1e9,
          "requests per second per tenant (POST and DELETE; token bucket); 0 = unlimited"),
    P_INT(pq_conf_t, "tenant_burst", tenant_burst, 0, 0, I32MAX,
          "per-tenant bucket size; 0 = tenant_rps rounded up (at least 1)"),
    P_I64(pq_conf_t, "max_file_bytes", max_file_bytes, 100 * 1024 * 1024, 1024, 256 * 1024 * 1024,
          "largest file of POST /v1/files (one Redis value; at most 256 MiB)"),
    P_INT(pq_conf_t, "max_batch_lines", max_batch_lines, 50000, 1, 1000000,
          "most request lines in one batch input file"),
};

static const prop_t worker_props[] = {
    P_INT(pq_conf_t, "max_inflight", max_inflight, 4096, 1, 1000000,
          "provider calls in flight per process"),
    P_STR(pq_conf_t, "group_id", group_id, "promptq-workers", PF_NONEMPTY, "Kafka consumer group"),
    P_I64(pq_conf_t, "park_ttl_s", park_ttl_s, 86400, 1, TEN_YEARS_S,
          "a parked job older than this expires"),
    P_I64(pq_conf_t, "max_response_bytes", max_response_bytes, 4194304, 1024, GIB,
          "larger provider answers fail the job as too_large"),
    P_INT(pq_conf_t, "max_deliveries", max_deliveries, 5, 1, 1000,
          "deliveries without finishing before a job is poison"),
    P_INT(pq_conf_t, "lease_ms", lease_ms, 30000, 1000, ONE_HOUR_MS, "job lease, renewed"),
    P_INT(pq_conf_t, "max_attempts", max_attempts, 10, 1, 1000,
          "provider calls per job per pass over its route"),
    P_STR(pq_conf_t, "metrics_listen", metrics_listen, PQ_WORKER_METRICS_DEFAULT, 0,
          "HOST:PORT serving GET /metrics and /healthz; empty = off. The default address "
          "already taken (a second worker on the machine) is a warning, any other a start-up "
          "error"),
};

static const prop_t callback_props[] = {
    P_LIST(PT_STRLIST, pq_conf_t, "allow_hosts", callback_hosts, ncallback_hosts, 0,
           "hosts callback_url may name: \"host\", \"*.domain\" (subdomains), \"[v6]\", each "
           "optionally \":port\"; empty: no callbacks are sent"),
    P_LIST(PT_KVMAP, pq_conf_t, "secrets", callback_secrets, ncallback_secrets, 0,
           "tenant -> signing secret (\"*\" for any other tenant); a tenant without one gets "
           "no callbacks"),
    P_INT(pq_conf_t, "timeout_ms", callback_timeout_ms, 10000, 100, 600000, "one POST"),
    P_INT(pq_conf_t, "max_attempts", callback_max_attempts, 12, 1, 1000,
          "POSTs before the callback is failed"),
    P_INT(pq_conf_t, "backoff_ms", callback_backoff_ms, 1000, 10, ONE_HOUR_MS,
          "first retry delay (doubles, with jitter)"),
    P_INT(pq_conf_t, "max_backoff_ms", callback_max_backoff_ms, 600000, 10, 24 * ONE_HOUR_MS,
          "retry delay cap"),
    P_INT(pq_conf_t, "max_inflight", callback_max_inflight, 64, 1, 100000,
          "callback POSTs in flight per worker"),
    P_INT(pq_conf_t, "poll_ms", callback_poll_ms, 500, 10, 60000,
          "how often a worker looks for due callbacks"),
};

static const prop_t log_props[] = {
    P_ENUM(pq_conf_t, "level", log_level, "info", "debug|info|warn|error", 0, "log threshold"),
    P_BOOL(pq_conf_t, "json", log_json, 0, "one JSON object per line"),
};

static const prop_t provider_props[] = {
    P_ENUM(pq_provider_conf_t, "type", type, NULL, "openai|azure_openai|anthropic|gemini|watsonx",
           PF_REQUIRED, "wire format"),
    P_STR(pq_provider_conf_t, "base_url", base_url, NULL, PF_NONEMPTY,
          "API base URL; default per type (required for azure_openai)"),
    P_LIST(PT_STR1, pq_provider_conf_t, "api_key", api_keys, napi_keys, PF_NONEMPTY, "one key"),
    P_LIST(PT_STRLIST, pq_provider_conf_t, "api_keys", api_keys, napi_keys, PF_NONEMPTY,
           "keys rotated; one that answers 429/401 rests"),
    P_LIST(PT_KVMAP, pq_provider_conf_t, "headers", headers, nheaders, PF_HEADERS,
           "extra request headers"),
    P_INT(pq_provider_conf_t, "timeout_ms", timeout_ms, 60000, 1, ONE_HOUR_MS,
          "total timeout of one call"),
    P_INT(pq_provider_conf_t, "connect_timeout_ms", connect_timeout_ms, 10000, 1, ONE_HOUR_MS,
          "TCP and TLS connect timeout"),
    P_INT(pq_provider_conf_t, "first_byte_timeout_ms", first_byte_timeout_ms, 0, 0, ONE_HOUR_MS,
          "from sending the request to the answer's first byte; 0 = timeout_ms"),
    P_INT(pq_provider_conf_t, "idle_timeout_ms", idle_timeout_ms, 30000, 0, ONE_HOUR_MS,
          "longest gap between two received parts of an answer; 0 = none"),
    P_BOOL(pq_provider_conf_t, "retry_on_timeout", retry_on_timeout, 0,
           "a timeout retries the same target (false: the next target at once)"),
    P_INT(pq_provider_conf_t, "max_rest_ms", max_rest_ms, 60000, 1, ONE_HOUR_MS,
          "longest a key rests for one model after a 429, whatever Retry-After says; a longer "
          "Retry-After makes the job move to the next target"),
    P_INT(pq_provider_conf_t, "max_concurrency", max_concurrency, 256, 0, 1000000,
          "calls in flight; 0 = unlimited"),
    P_INT(pq_provider_conf_t, "rpm", rpm, 0, 0, I32MAX, "requests per minute; 0 = unlimited"),
    P_INT(pq_provider_conf_t, "tpm", tpm, 0, 0, I32MAX, "tokens per minute; 0 = unlimited"),
    P_INT(pq_provider_conf_t, "retries_per_target", retries_per_target, 2, 0, 100,
          "retries of a retryable error before the next target"),
    P_INT(pq_provider_conf_t, "max_retry_wait_ms", max_retry_wait_ms, 10000, 0, ONE_HOUR_MS,
          "longest a job waits for the same target after a 429 (else it moves on)"),
    P_INT(pq_provider_conf_t, "retry_base_ms", retry_base_ms, 200, 1, 600000, "backoff base"),
    P_INT(pq_provider_conf_t, "retry_max_ms", retry_max_ms, 5000, 1, ONE_HOUR_MS, "backoff cap"),
    P_INT(pq_provider_conf_t, "key_rest_ms", key_rest_ms, 30000, 0, ONE_HOUR_MS,
          "rest of a key that answered 401, or a quota error for the whole key"),
    P_INT(pq_provider_conf_t, "circuit_failures", circuit_failures, 5, 1, 1000000,
          "consecutive failures that open the circuit"),
    P_DBL(pq_provider_conf_t, "circuit_ratio", circuit_ratio, 0.5, 0.01, 1.0,
          "failure ratio over the window that opens the circuit"),
    P_INT(pq_provider_conf_t, "circuit_window", circuit_window, 20, 1, 100000,
          "calls in the ratio window"),
    P_INT(pq_provider_conf_t, "circuit_cooldown_ms", circuit_cooldown_ms, 5000, 1, ONE_HOUR_MS,
          "open -> half-open"),
    P_INT(pq_provider_conf_t, "probe_interval_ms", probe_interval_ms, 5000, 100, 5000,
          "probe period of an open circuit"),
    P_ENUM(pq_provider_conf_t, "probe", probe, "completion", "completion|models", 0,
           "probe kind: 1-token completion or model list"),
    P_ENUM(pq_provider_conf_t, "half_open", half_open, "probe", "probe|call", 0,
           "what tests a half-open circuit: the worker's probe, or the next job's real call"),
    P_BOOL(pq_provider_conf_t, "supports_prefill", supports_prefill, 0,
           "continues a trailing assistant message (Anthropic does): a streamed answer cut "
           "after chunks reached the client continues here from what was sent, without a "
           "restart"),
    P_ENUM(pq_provider_conf_t, "stream_malformed", stream_malformed, "failover", "failover|skip", 0,
           "a malformed event in a streamed answer: fail the attempt over, or skip the event"),
    P_STR(pq_provider_conf_t, "status_url", status_url, NULL, PF_NONEMPTY,
          "statuspage.io /api/v2/status.json, an extra health signal"),
    P_STR(pq_provider_conf_t, "api_version", api_version, NULL, PF_NONEMPTY,
          "azure_openai api-version (required there unless azure_api is v1)"),
    P_ENUM(pq_provider_conf_t, "azure_api", azure_api, "deployments", "deployments|v1", 0,
           "azure_openai API: /openai/deployments/{model}?api-version=, or the v1 API "
           "(/openai/v1, model in the body, no api-version)"),
    P_STR(pq_provider_conf_t, "project_id", project_id, NULL, PF_NONEMPTY,
          "watsonx project; watsonx needs exactly one of project_id and space_id"),
    P_STR(pq_provider_conf_t, "space_id", space_id, NULL, PF_NONEMPTY,
          "watsonx deployment space, instead of project_id"),
    P_STR(pq_provider_conf_t, "watsonx_version", watsonx_version, NULL, PF_NONEMPTY,
          "watsonx API version date YYYY-MM-DD (the chat URL's ?version=); "
          "default " PQ_WATSONX_VERSION_DEFAULT),
    P_STR(pq_provider_conf_t, "iam_url", iam_url, NULL, PF_NONEMPTY,
          "watsonx IAM token URL; default " DEFAULT_IAM_URL),
    P_STR(pq_provider_conf_t, "ca_file", ca_file, NULL, PF_NONEMPTY,
          "PEM file of the CA certificates trusted for base_url's TLS, instead of the system's "
          "(a private CA); verification stays on"),
    P_INT(pq_provider_conf_t, "default_max_tokens", default_max_tokens, 4096, 1, 10000000,
          "anthropic max_tokens when the request has none"),
};

static const prop_t target_props[] = {
    P_STR(pq_target_t, "provider", provider, NULL, PF_REQUIRED | PF_NONEMPTY,
          "key in \"providers\""),
    P_STR(pq_target_t, "model", model, NULL, PF_REQUIRED | PF_NONEMPTY, "model name it takes"),
    P_I64(pq_target_t, "max_context_tokens", max_context_tokens, 0, 0, 1000000000,
          "context window; a context_length_exceeded moves only to a target with a larger one; "
          "0 = not given"),
    P_INT(pq_target_t, "timeout_ms", timeouts.total_ms, -1, -1, ONE_HOUR_MS,
          "the provider's timeout_ms for this target; -1 = the provider's"),
    P_INT(pq_target_t, "connect_timeout_ms", timeouts.connect_ms, -1, -1, ONE_HOUR_MS,
          "-1 = the provider's"),
    P_INT(pq_target_t, "first_byte_timeout_ms", timeouts.first_byte_ms, -1, -1, ONE_HOUR_MS,
          "-1 = the provider's"),
    P_INT(pq_target_t, "idle_timeout_ms", timeouts.idle_ms, -1, -1, ONE_HOUR_MS,
          "-1 = the provider's"),
    P_INT(pq_target_t, "supports_prefill", supports_prefill, -1, -1, 1,
          "1/0: this model continues (does not continue) an assistant prefill; -1 = the "
          "provider's supports_prefill"),
};

/* A route as an object (the list form is "targets" alone). */
static const prop_t route_props[] = {
    P_ENUM(pq_route_t, "on_bad_request", on_bad_request_name, "next_provider", "next_provider|end",
           0, "a 400/422 refusal: the next target of another provider, or end the job"),
    P_INT(pq_route_t, "budget_ms", budget_ms, 0, 0, ONE_HOUR_MS,
          "interactive calls a client waits for: time for the whole attempt chain; 0 = "
          "broker.sync_timeout_ms - 1000"),
    P_INT(pq_route_t, "reserve_ms", reserve_ms, 10000, 0, ONE_HOUR_MS,
          "of the budget, kept for the later targets when an attempt is cut to fit"),
};

#define NPROPS(t) (sizeof(t) / sizeof((t)[0]))

typedef struct {
    const char *name;
    const prop_t *props;
    size_t n;
} section_t;

static const section_t sections[] = {
    {"topics", topics_props, NPROPS(topics_props)},
    {"redis", redis_props, NPROPS(redis_props)},
    {"broker", broker_props, NPROPS(broker_props)},
    {"worker", worker_props, NPROPS(worker_props)},
    {"log", log_props, NPROPS(log_props)},
    {"cache", cache_props, NPROPS(cache_props)},
    {"callbacks", callback_props, NPROPS(callback_props)},
};

#define FIELD(base, p, T) ((T *)((char *)(base) + (p)->off))
#define COUNT(base, p)    ((size_t *)((char *)(base) + (p)->cnt_off))

static void strlist_free(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

static void kv_free(pq_kv_t *kv, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(kv[i].key);
        free(kv[i].value);
    }
    free(kv);
}

static void props_free(const prop_t *t, size_t n, void *base)
{
    for (size_t i = 0; i < n; i++) {
        const prop_t *p = &t[i];

        switch (p->type) {
        case PT_STR:
        case PT_ENUM:
            free(*FIELD(base, p, char *));
            *FIELD(base, p, char *) = NULL;
            break;
        case PT_STRLIST:
        case PT_STR1:
            strlist_free(*FIELD(base, p, char **), *COUNT(base, p));
            *FIELD(base, p, char **) = NULL;
            *COUNT(base, p) = 0;
            break;
        case PT_KVMAP:
            kv_free(*FIELD(base, p, pq_kv_t *), *COUNT(base, p));
            *FIELD(base, p, pq_kv_t *) = NULL;
            *COUNT(base, p) = 0;
            break;
        default:
            break;
        }
    }
}

static int props_defaults(const prop_t *t, size_t n, void *base, cerr_t *e)
{
    for (size_t i = 0; i < n; i++) {
        const prop_t *p = &t[i];

        switch (p->type) {
        case PT_INT:
        case PT_BOOL:
            *FIELD(base, p, int) = (int)p->idef;
            break;
        case PT_I64:
            *FIELD(base, p, int64_t) = p->idef;
            break;
        case PT_DBL:
            *FIELD(base, p, double) = p->ddef;
            break;
        case PT_STR:
        case PT_ENUM:
            if (p->sdef && !(*FIELD(base, p, char *) = strdup(p->sdef)))
                return fail(e, NULL, "out of memory");
            break;
        default:
            break;
        }
    }
    return 0;
}

static int enum_has(const char *enums, const char *s)
{
    size_t n = strlen(s);

    while (*enums) {
        const char *bar = strchr(enums, '|');
        size_t len = bar ? (size_t)(bar - enums) : strlen(enums);

        if (len == n && !strncmp(enums, s, n))
            return 1;
        enums += len + (bar ? 1 : 0);
    }
    return 0;
}

/* "a|b|c" -> "a, b, c" */
static void enum_list(const char *enums, char *list, size_t size)
{
    size_t o = 0;

    for (const char *c = enums; *c && o + 3 < size; c++) {
        if (*c == '|') {
            list[o++] = ',';
            list[o++] = ' ';
        } else {
            list[o++] = *c;
        }
    }
    list[o] = '\0';
}

/* A string value: no NUL inside, capped. */
static int get_string(json_t *v, const char *path, unsigned flags, const char **out, cerr_t *e)
{
    const char *s;

    if (!json_is_string(v))
        return fail(e, path, "must be a string");
    s = json_string_value(v);
    if (json_string_length(v) != strlen(s))
        return fail(e, path, "must not contain NUL characters");
    if (json_string_length(v) > CONF_MAX_STR)
        return fail(e, path, "longer than %d bytes", CONF_MAX_STR);
    if ((flags & PF_NONEMPTY) && !*s)
        return fail(e, path, "must not be empty");
    *out = s;
    return 0;
}

static int header_name_ok(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s <= ' ' || *s >= 127 || strchr("()<>@,;:\\\"/[]?={}", *s))
            return 0;
    return 1;
}

static int set_kvmap(const prop_t *p, void *base, json_t *v, const char *path, cerr_t *e)
{
    size_t n = json_object_size(v), i = 0;
    pq_kv_t *kv;
    const char *key;
    json_t *val;
    char sub[CONF_PATH_MAX];

    if (!json_is_object(v))
        return fail(e, path, "must be an object");
    if (n > CONF_MAX_LIST)
        return fail(e, path, "more than %d entries", CONF_MAX_LIST);
    if (!(kv = calloc(n + 1, sizeof(*kv))))
        return fail(e, path, "out of memory");
    json_object_foreach(v, key, val)
    {
        const char *s;

        if (p->flags & PF_SECRET_KEYS) /* never echo a secret key: name its position */
            path_fmt(sub, sizeof(sub), "%s (entry %zu)", path, i + 1);
        else
            path_key(sub, sizeof(sub), path, key);
        if (get_string(val, sub, (p->flags & PF_SECRET_KEYS) ? PF_NONEMPTY : 0, &s, e))
            goto out_free;
        if (p->flags & PF_SECRET_KEYS) {
            if (!(kv[i].key = env_expand(key, sub, e)))
                goto out_free;
            if (!*kv[i].key) {
                fail(e, sub, "key must not be empty");
                i++;
                goto out_free;
            }
        } else if (!(kv[i].key = strdup(key))) {
            fail(e, sub, "out of memory");
            goto out_free;
        }
        if (!(kv[i].value = strdup(s))) {
            i++;
            fail(e, sub, "out of memory");
            goto out_free;
        }
        i++;
        if ((p->flags & PF_TENANTS) && !pq_tenant_valid(s)) {
            /* the value, not the key: keys may be secrets */
            fail(e, sub, "tenant \"%.64s\" must match %s", s, PQ_TENANT_PATTERN);
            goto out_free;
        }
        if ((p->flags & PF_HEADERS) &&
            (!header_name_ok(key) || strchr(s, '\r') || strchr(s, '\n'))) {
            fail(e, sub, "not a valid HTTP header");
            goto out_free;
        }
        for (size_t j = 0; (p->flags & PF_SECRET_KEYS) && j + 1 < i; j++) {
            if (!strcmp(kv[j].key, kv[i - 1].key)) {
                fail(e, sub, "same key as entry %zu", j + 1);
                goto out_free;
            }
        }
    }
    kv_free(*FIELD(base, p, pq_kv_t *), *COUNT(base, p));
    *FIELD(base, p, pq_kv_t *) = kv;
    *COUNT(base, p) = n;
    return 0;

out_free:
    kv_free(kv, i);
    return -1;
}

static int set_strlist(const prop_t *p, void *base, json_t *v, const char *path, cerr_t *e)
{
    size_t n, i;
    char **list;
    json_t *el;
    char sub[CONF_PATH_MAX];

    if (p->type == PT_STR1) {
        const char *s;

        if (get_string(v, path, p->flags, &s, e))
            return -1;
        n = 1;
    } else {
        if (!json_is_array(v))
            return fail(e, path, "must be a list of strings");
        n = json_array_size(v);
        if ((p->flags & PF_NONEMPTY) && n == 0)
            return fail(e, path, "must not be empty");
        if (n > CONF_MAX_LIST)
            return fail(e, path, "more than %d entries", CONF_MAX_LIST);
    }
    if (!(list = calloc(n + 1, sizeof(*list))))
        return fail(e, path, "out of memory");
    for (i = 0; i < n; i++) {
        const char *s;

        el = p->type == PT_STR1 ? v : json_array_get(v, i);
        if (p->type == PT_STR1)
            path_fmt(sub, sizeof(sub), "%s", path);
        else
            path_index(sub, sizeof(sub), path, i);
        if (get_string(el, sub, p->flags, &s, e))
            goto out_free;
        if ((p->flags & PF_TENANTS) && !pq_tenant_valid(s)) {
            fail(e, sub, "tenant \"%.64s\" must match %s", s, PQ_TENANT_PATTERN);
            goto out_free;
        }
        if (!(list[i] = strdup(s))) {
            fail(e, sub, "out of memory");
            goto out_free;
        }
    }
    strlist_free(*FIELD(base, p, char **), *COUNT(base, p));
    *FIELD(base, p, char **) = list;
    *COUNT(base, p) = n;
    return 0;

out_free:
    strlist_free(list, i);
    return -1;
}

/* The one setter: validates v against p and stores it into base. */
static int prop_set(const prop_t *p, void *base, json_t *v, const char *path, cerr_t *e)
{
    switch (p->type) {
    case PT_INT:
    case PT_I64: {
        json_int_t x;

        if (!json_is_integer(v))
            return fail(e, path, "must be an integer");
        x = json_integer_value(v);
        if (x < p->imin || x > p->imax)
            return fail(e, path, "must be between %lld and %lld", (long long)p->imin,
                        (long long)p->imax);
        if (p->type == PT_INT)
            *FIELD(base, p, int) = (int)x;
        else
            *FIELD(base, p, int64_t) = (int64_t)x;
        return 0;
    }
    case PT_BOOL:
        if (!json_is_boolean(v))
            return fail(e, path, "must be true or false");
        *FIELD(base, p, int) = json_is_true(v);
        return 0;
    case PT_DBL: {
        double x;

        if (!json_is_number(v))
            return fail(e, path, "must be a number");
        x = json_number_value(v);
        if (!(x >= p->dmin && x <= p->dmax))
            return fail(e, path, "must be between %g and %g", p->dmin, p->dmax);
        *FIELD(base, p, double) = x;
        return 0;
    }
    case PT_STR:
    case PT_ENUM: {
        const char *s;
        char *copy;

        if (get_string(v, path, p->flags, &s, e))
            return -1;
        if (p->type == PT_ENUM && !enum_has(p->enums, s)) {
            char list[256];

            enum_list(p->enums, list, sizeof(list));
            return fail(e, path, "unknown value \"%.64s\": must be one of %s", s, list);
        }
        if (!(copy = strdup(s)))
            return fail(e, path, "out of memory");
        free(*FIELD(base, p, char *));
        *FIELD(base, p, char *) = copy;
        return 0;
    }
    case PT_STRLIST:
    case PT_STR1:
        return set_strlist(p, base, v, path, e);
    case PT_KVMAP:
        return set_kvmap(p, base, v, path, e);
    }
    return fail(e, path, "internal: unknown property type");
}

static const prop_t *prop_find(const prop_t *t, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(t[i].name, name))
            return &t[i];
    return NULL;
}

/* Applies every key of obj (an object) to base: unknown keys are errors, then checks that the
 * required properties are present. */
static int props_apply(const prop_t *t, size_t n, void *base, json_t *obj, const char *path,
                       cerr_t *e)
{
    const char *key;
    json_t *v;
    char sub[CONF_PATH_MAX];

    json_object_foreach(obj, key, v)
    {
        const prop_t *p = prop_find(t, n, key);

        path_key(sub, sizeof(sub), path, key);
        if (!p)
            return fail(e, sub, "unknown key");
        if (prop_set(p, base, v, sub, e))
            return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if ((t[i].flags & PF_REQUIRED) && !json_object_get(obj, t[i].name)) {
            path_key(sub, sizeof(sub), path, t[i].name);
            return fail(e, sub, "missing (required)");
        }
    }
    return 0;
}

/* ---- sections --------------------------------------------------------------------------- */

static int kv_append(pq_kv_t **kv, size_t *n, const char *key, const char *value)
{
    pq_kv_t *p = realloc(*kv, (*n + 1) * sizeof(**kv));

    if (!p)
        return -1;
    *kv = p;
    p[*n].key = strdup(key);
    p[*n].value = strdup(value);
    if (!p[*n].key || !p[*n].value) {
        free(p[*n].key);
        free(p[*n].value);
        return -1;
    }
    (*n)++;
    return 0;
}

static pq_kv_t *kv_find(pq_kv_t *kv, size_t n, const char *key)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(kv[i].key, key))
            return &kv[i];
    return NULL;
}

/* kafka: string values passed through to librdkafka, each checked on a scratch conf so that
 * --check-config catches typos and refused keys. */
static int load_kafka(pq_conf_t *c, json_t *obj, cerr_t *e)
{
    rd_kafka_conf_t *scratch = NULL;
    const char *key, *env;
    json_t *v;
    char sub[CONF_PATH_MAX];
    pq_kv_t *bs;
    int rc = -1;

    if (obj) {
        if (!json_is_object(obj))
            return fail(e, "kafka", "must be an object");
        if (!(scratch = rd_kafka_conf_new()))
            return fail(e, "kafka", "out of memory");
        json_object_foreach(obj, key, v)
        {
            const char *s;

            path_key(sub, sizeof(sub), "kafka", key);
            if (!json_is_string(v)) {
                fail(e, sub, "must be a string (librdkafka properties are strings)");
                goto out;
            }
            if (get_string(v, sub, 0, &s, e) || pq_kafka_conf_set(scratch, key, s, e->buf, e->size))
                goto out;
            if (kv_append(&c->kafka, &c->nkafka, key, s)) {
                fail(e, sub, "out of memory");
                goto out;
            }
        }
    }

    /* bootstrap: PROMPTQ_KAFKA_BOOTSTRAP, else the file (either spelling), else localhost */
    bs = kv_find(c->kafka, c->nkafka, "bootstrap.servers");
    if (!bs)
        bs = kv_find(c->kafka, c->nkafka, "metadata.broker.list");
    env = getenv("PROMPTQ_KAFKA_BOOTSTRAP");
    if (env && *env) {
        char *copy = strdup(env);

        if (!copy) {
            fail(e, "kafka", "out of memory");
            goto out;
        }
        if (bs) {
            free(bs->value);
            bs->value = copy;
        } else {
            int r = kv_append(&c->kafka, &c->nkafka, "bootstrap.servers", copy);

            free(copy);
            if (r) {
                fail(e, "kafka", "out of memory");
                goto out;
            }
            bs = &c->kafka[c->nkafka - 1];
        }
    } else if (!bs) {
        if (kv_append(&c->kafka, &c->nkafka, "bootstrap.servers", DEFAULT_BOOTSTRAP)) {
            fail(e, "kafka", "out of memory");
            goto out;
        }
        bs = &c->kafka[c->nkafka - 1];
    }
    if (!*bs->value) {
        fail(e, "kafka.bootstrap.servers", "must not be empty");
        goto out;
    }
    c->bootstrap = bs->value;
    rc = 0;
out:
    if (scratch)
        rd_kafka_conf_destroy(scratch);
    return rc;
}

static int topic_chars_ok(const char *s)
{
    for (; *s; s++)
        if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') ||
              *s == '.' || *s == '_' || *s == '-'))
            return 0;
    return 1;
}

static char *topic_sanitize(const char *name)
{
    char *t = strdup(name);

    for (char *s = t; s && *s; s++)
        if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') ||
              *s == '.' || *s == '_' || *s == '-'))
            *s = '_';
    return t;
}

static int url_ok(const char *s)
{
    return !strncmp(s, "http://", 7) || !strncmp(s, "https://", 8);
}

/* 1 when s is a date "YYYY-MM-DD" (digits and dashes in place; the month and day in range). */
static int version_date_ok(const char *s)
{
    if (strlen(s) != 10 || s[4] != '-' || s[7] != '-')
        return 0;
    for (int i = 0; i < 10; i++)
        if (i != 4 && i != 7 && (s[i] < '0' || s[i] > '9'))
            return 0;
    return atoi(s + 5) >= 1 && atoi(s + 5) <= 12 && atoi(s + 8) >= 1 && atoi(s + 8) <= 31;
}

static const char *default_base_url(const char *type)
{
    if (!strcmp(type, "openai"))
        return "https://api.openai.com/v1";
    if (!strcmp(type, "anthropic"))
        return "https://api.anthropic.com";
    if (!strcmp(type, "gemini"))
        return "https://generativelanguage.googleapis.com";
    if (!strcmp(type, "watsonx"))
        return "https://us-south.ml.cloud.ibm.com";
    return NULL; /* azure_openai: the resource URL is the user's */
}

static int provider_name_ok(const char *s)
{
    size_t n = strlen(s);

    return n >= 1 && n <= 64 && topic_chars_ok(s);
}

static int load_provider(pq_provider_conf_t *p, const char *name, json_t *obj, cerr_t *e)
{
    char path[CONF_PATH_MAX], sub[CONF_PATH_MAX];
    char **base_url = &p->base_url;
    size_t n;

    path_key(path, sizeof(path), "providers", name);
    if (!(p->name = strdup(name)))
        return fail(e, path, "out of memory");
    if (props_defaults(provider_props, NPROPS(provider_props), p, e))
        return -1;
    if (!provider_name_ok(name))
        return fail(e, path, "a provider name must be 1-64 characters of [A-Za-z0-9._-]");
    if (!json_is_object(obj))
        return fail(e, path, "must be an object");
    if (json_object_get(obj, "api_key") && json_object_get(obj, "api_keys"))
        return fail(e, path, "api_key and api_keys are both set; use one of them");
    if (props_apply(provider_props, NPROPS(provider_props), p, obj, path, e))
        return -1;

    path_key(sub, sizeof(sub), path, "base_url");
    if (!*base_url) {
        const char *def = default_base_url(p->type);

        if (!def)
            return fail(e, sub, "required for type %s", p->type);
        if (!(*base_url = strdup(def)))
            return fail(e, sub, "out of memory");
    }
    if (!url_ok(*base_url))
        return fail(e, sub, "must start with http:// or https://");
    n = strlen(*base_url);
    while (n > 0 && (*base_url)[n - 1] == '/')
        (*base_url)[--n] = '\0';

    if (p->status_url && !url_ok(p->status_url)) {
        path_key(sub, sizeof(sub), path, "status_url");
        return fail(e, sub, "must start with http:// or https://");
    }
    if (!strcmp(p->type, "azure_openai") && !p->api_version && strcmp(p->azure_api, "v1") != 0) {
        path_key(sub, sizeof(sub), path, "api_version");
        return fail(e, sub, "required for type azure_openai unless azure_api is \"v1\"");
    }
    if (!strcmp(p->type, "watsonx")) {
        if (!p->project_id && !p->space_id) {
            path_key(sub, sizeof(sub), path, "project_id");
            return fail(e, sub, "required for type watsonx (or space_id)");
        }
        if (p->project_id && p->space_id) {
            path_key(sub, sizeof(sub), path, "space_id");
            return fail(e, sub, "give project_id or space_id, not both");
        }
        if (!p->watsonx_version && !(p->watsonx_version = strdup(PQ_WATSONX_VERSION_DEFAULT)))
            return fail(e, path, "out of memory");
        if (!version_date_ok(p->watsonx_version)) {
            path_key(sub, sizeof(sub), path, "watsonx_version");
            return fail(e, sub, "must be a date YYYY-MM-DD");
        }
        if (!p->iam_url && !(p->iam_url = strdup(DEFAULT_IAM_URL)))
            return fail(e, path, "out of memory");
        if (!url_ok(p->iam_url)) {
            path_key(sub, sizeof(sub), path, "iam_url");
            return fail(e, sub, "must start with http:// or https://");
        }
    }
    if (p->ca_file) {
        FILE *f = fopen(p->ca_file, "r");

        path_key(sub, sizeof(sub), path, "ca_file");
        if (!f)
            return fail(e, sub, "cannot read %s: %s", p->ca_file, strerror(errno));
        fclose(f);
        if (strncmp(*base_url, "https://", 8) != 0)
            return fail(e, sub, "set, but base_url is not https://");
    }
    if (p->retry_base_ms > p->retry_max_ms) {
        path_key(sub, sizeof(sub), path, "retry_base_ms");
        return fail(e, sub, "must not exceed retry_max_ms (%d)", p->retry_max_ms);
    }
    return 0;
}

static int load_providers(pq_conf_t *c, json_t *obj, cerr_t *e)
{
    const char *name;
    json_t *v;

    if (!obj)
        return fail(e, "providers", "missing (required)");
    if (!json_is_object(obj))
        return fail(e, "providers", "must be an object");
    if (json_object_size(obj) == 0)
        return fail(e, "providers", "must name at least one provider");
    if (!(c->providers = calloc(json_object_size(obj), sizeof(*c->providers))))
        return fail(e, "providers", "out of memory");
    json_object_foreach(obj, name, v)
    {
        if (load_provider(&c->providers[c->nproviders++], name, v, e))
            return -1;
    }
    return 0;
}

/* Target timeouts left at -1 take the provider's. */
static void target_resolve_timeouts(pq_target_t *t)
{
    pq_timeouts_t *o = &t->timeouts;

    if (o->total_ms < 0)
        o->total_ms = t->p->timeout_ms;
    if (o->connect_ms < 0)
        o->connect_ms = t->p->connect_timeout_ms;
    if (o->first_byte_ms < 0)
        o->first_byte_ms = t->p->first_byte_timeout_ms;
    if (o->idle_ms < 0)
        o->idle_ms = t->p->idle_timeout_ms;
}

static int load_route(pq_conf_t *c, pq_route_t *r, const char *name, json_t *arr, cerr_t *e)
{
    char path[CONF_PATH_MAX], sub[CONF_PATH_MAX];
    size_t n, retry_len;
    json_t *el;

    path_key(path, sizeof(path), "routes", name);
    if (!(r->name = strdup(name)) || !(r->topic_name = topic_sanitize(name)))
        return fail(e, path, "out of memory");
    if (!*name)
        return fail(e, "routes", "a route name must not be empty");
    for (const char *s = name; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return fail(e, path, "a route name must not contain control characters");
    retry_len = strlen(c->topic_prefix) + strlen("retry.") + strlen(r->topic_name);
    if (retry_len > KAFKA_TOPIC_MAX)
        return fail(e, path, "name too long: its retry topic would exceed %d characters",
                    KAFKA_TOPIC_MAX);
    for (size_t i = 0; i + 1 < c->nroutes; i++)
        if (!strcmp(c->routes[i].topic_name, r->topic_name))
            return fail(e, path,
                        "same retry topic as route \"%s\" (names differ only in "
                        "characters outside [A-Za-z0-9._-])",
                        c->routes[i].name);

    if (props_defaults(route_props, NPROPS(route_props), r, e))
        return -1;
    if (json_is_object(arr)) {
        /* {"targets": [...], route settings} */
        json_t *o = arr, *settings;
        char tpath[CONF_PATH_MAX];
        int rc;

        path_key(tpath, sizeof(tpath), path, "targets");
        arr = json_object_get(o, "targets");
        if (!arr)
            return fail(e, path, "must be a list of targets, or an object with \"targets\"");
        if (!json_is_array(arr))
            return fail(e, tpath, "must be a list of targets");
        settings = json_copy(o); /* shallow */
        if (!settings)
            return fail(e, path, "out of memory");
        json_object_del(settings, "targets");
        rc = props_apply(route_props, NPROPS(route_props), r, settings, path, e);
        json_decref(settings);
        if (rc)
            return -1;
        r->on_bad_request = !strcmp(r->on_bad_request_name, "end") ? PQ_BAD_REQUEST_END
                                                                   : PQ_BAD_REQUEST_NEXT_PROVIDER;
        snprintf(path, sizeof(path), "%s", tpath);
    } else if (!json_is_array(arr)) {
        return fail(e, path, "must be a list of targets or an object with \"targets\"");
    }
    n = json_array_size(arr);
    if (n == 0)
        return fail(e, path, "must have at least one target");
    if (n > CONF_MAX_LIST)
        return fail(e, path, "more than %d targets", CONF_MAX_LIST);
    if (!(r->targets = calloc(n, sizeof(*r->targets))))
        return fail(e, path, "out of memory");
    for (size_t i = 0; i < n; i++) {
        pq_target_t *t = &r->targets[r->ntargets++];

        el = json_array_get(arr, i);
        path_index(sub, sizeof(sub), path, i);
        if (!json_is_object(el))
            return fail(e, sub, "must be an object {\"provider\", \"model\"}");
        if (props_defaults(target_props, NPROPS(target_props), t, e) ||
            props_apply(target_props, NPROPS(target_props), t, el, sub, e))
            return -1;
        if (!(t->p = pq_conf_provider(c, t->provider))) {
            char ppath[CONF_PATH_MAX];

            path_key(ppath, sizeof(ppath), sub, "provider");
            return fail(e, ppath, "unknown provider \"%.64s\"", t->provider);
        }
        target_resolve_timeouts(t);
    }
    return 0;
}

static int load_routes(pq_conf_t *c, json_t *obj, cerr_t *e)
{
    const char *name;
    json_t *v;

    if (!obj)
        return fail(e, "routes", "missing (required)");
    if (!json_is_object(obj))
        return fail(e, "routes", "must be an object");
    if (json_object_size(obj) == 0)
        return fail(e, "routes", "must name at least one route");
    if (!(c->routes = calloc(json_object_size(obj), sizeof(*c->routes))))
        return fail(e, "routes", "out of memory");
    json_object_foreach(obj, name, v)
    {
        c->nroutes++;
        if (load_route(c, &c->routes[c->nroutes - 1], name, v, e))
            return -1;
    }
    return 0;
}

/* Splits "host:port" / "[v6]:port" / ":port". */
static int parse_listen(pq_conf_t *c, cerr_t *e)
{
    const char *s = c->listen, *colon, *hs, *he;
    char *end;
    long port;

    if (s[0] == '[') {
        he = strchr(s, ']');
        if (!he || he[1] != ':')
            goto bad;
        hs = s + 1;
        colon = he + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon)
            goto bad;
        hs = s;
        he = colon;
    }
    errno = 0;
    port = strtol(colon + 1, &end, 10);
    if (!colon[1] || *end || errno || port < 0 || port > 65535)
        goto bad;
    c->listen_host = he > hs ? strndup(hs, (size_t)(he - hs)) : strdup("0.0.0.0");
    if (!c->listen_host)
        return fail(e, "broker.listen", "out of memory");
    c->listen_port = (int)port;
    return 0;
bad:
    return fail(e, "broker.listen", "must be HOST:PORT (port 0-65535)");
}

static int pct_decode(char *s)
{
    char *o = s;

    for (; *s; s++) {
        if (*s == '%') {
            int hi, lo;
            char h[3] = {0};

            if (!s[1] || !s[2])
                return -1;
            h[0] = s[1];
            h[1] = s[2];
            if (sscanf(h, "%1x%1x", &hi, &lo) != 2)
                return -1;
            *o++ = (char)(hi * 16 + lo);
            s += 2;
        } else {
            *o++ = *s;
        }
    }
    *o = '\0';
    return 0;
}

int pq_conf_parse_redis_url(const char *url, char **host, int *port, int *db, char **password,
                            char *errstr, size_t errstr_size)
{
    cerr_t e = {errstr, errstr_size};
    const char *s, *at, *hs, *he, *rest, *slash;
    char *h = NULL, *pw = NULL, *end;
    long v;

    *host = NULL;
    *password = NULL;
    *port = 6379;
    *db = 0;
    if (!strncmp(url, "rediss://", 9))
        return fail(&e, NULL, "TLS (rediss://) is not supported");
    if (strncmp(url, "redis://", 8))
        return fail(&e, NULL, "must start with redis://");
    s = url + 8;
    slash = strchr(s, '/');
    at = memchr(s, '@', slash ? (size_t)(slash - s) : strlen(s));
    if (at) {
        const char *at2;

        /* the password may contain '@': the last '@' before the path ends it */
        while ((at2 = memchr(at + 1, '@', slash ? (size_t)(slash - at - 1) : strlen(at + 1))))
            at = at2;
        if (s[0] != ':')
            return fail(&e, NULL, "user names are not supported (write redis://:PASSWORD@HOST)");
        if (!(pw = strndup(s + 1, (size_t)(at - s - 1))))
            return fail(&e, NULL, "out of memory");
        if (pct_decode(pw)) {
            fail(&e, NULL, "bad %%-escape in the password");
            goto out_free;
        }
        s = at + 1;
    }
    if (s[0] == '[') {
        hs = s + 1;
        he = strchr(hs, ']');
        if (!he) {
            fail(&e, NULL, "unterminated [IPv6] host");
            goto out_free;
        }
        rest = he + 1;
    } else {
        hs = s;
        he = s + strcspn(s, ":/");
        rest = he;
    }
    if (he == hs) {
        fail(&e, NULL, "missing host");
        goto out_free;
    }
    if (*rest == ':') {
        errno = 0;
        v = strtol(rest + 1, &end, 10);
        if (end == rest + 1 || errno || v < 1 || v > 65535 || (*end && *end != '/')) {
            fail(&e, NULL, "bad port");
            goto out_free;
        }
        *port = (int)v;
        rest = end;
    }
    if (*rest == '/') {
        if (rest[1]) {
            errno = 0;
            v = strtol(rest + 1, &end, 10);
            if (end == rest + 1 || *end || errno || v < 0 || v > 100000) {
                fail(&e, NULL, "bad database number");
                goto out_free;
            }
            *db = (int)v;
        }
    } else if (*rest) {
        fail(&e, NULL, "unexpected characters after the host");
        goto out_free;
    }
    if (!(h = strndup(hs, (size_t)(he - hs)))) {
        fail(&e, NULL, "out of memory");
        goto out_free;
    }
    *host = h;
    *password = pw;
    return 0;

out_free:
    free(pw);
    return -1;
}

static int load_redis_url(pq_conf_t *c, cerr_t *e)
{
    const char *env = getenv("PROMPTQ_REDIS_URL"), *what = "redis.url";
    char msg[256];

    if (env && *env) {
        char *copy = strdup(env);

        if (!copy)
            return fail(e, what, "out of memory");
        free(c->redis_url);
        c->redis_url = copy;
        what = "PROMPTQ_REDIS_URL";
    }
    if (pq_conf_parse_redis_url(c->redis_url, &c->redis_host, &c->redis_port, &c->redis_db,
                                &c->redis_password, msg, sizeof(msg)))
        return fail(e, what, "%s", msg);
    return 0;
}

static int default_instance_id(pq_conf_t *c, cerr_t *e)
{
    char host[256], id[320];

    if (c->instance_id)
        return 0;
    if (gethostname(host, sizeof(host)) != 0)
        snprintf(host, sizeof(host), "localhost");
    host[sizeof(host) - 1] = '\0';
    snprintf(id, sizeof(id), "%s-%ld", host, (long)getpid());
    if (!(c->instance_id = strdup(id)))
        return fail(e, "broker.instance_id", "out of memory");
    return 0;
}

/* callbacks: allow_hosts entries well formed, secrets not empty, backoff within its cap. */
static int check_callbacks(const pq_conf_t *c, cerr_t *e)
{
    for (size_t i = 0; i < c->ncallback_hosts; i++)
        if (!pq_callback_pattern_ok(c->callback_hosts[i]))
            return fail(e, "callbacks.allow_hosts",
                        "entry %zu: want \"host\", \"*.domain\" or \"[v6]\", optionally "
                        "with \":port\"",
                        i + 1);
    for (size_t i = 0; i < c->ncallback_secrets; i++) {
        char sub[CONF_PATH_MAX];

        path_key(sub, sizeof(sub), "callbacks.secrets", c->callback_secrets[i].key);
        if (!c->callback_secrets[i].value[0])
            return fail(e, sub, "must not be empty");
    }
    if (c->callback_backoff_ms > c->callback_max_backoff_ms)
        return fail(e, "callbacks.backoff_ms", "larger than callbacks.max_backoff_ms");
    return 0;
}

static pq_conf_t *conf_from_text(const char *text, size_t len, const char *file, cerr_t *e)
{
    json_error_t jerr;
    json_t *root, *v;
    pq_conf_t *c = NULL;
    const char *key;

    if (!(root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr))) {
        /* jansson quotes the offending token ("near '...'"): it may be a secret, drop it */
        char *near = strstr(jerr.text, " near '");

        if (near)
            *near = '\0';
        fail(e, NULL, "invalid JSON at line %d column %d: %s", jerr.line, jerr.column, jerr.text);
        return NULL;
    }
    if (!json_is_object(root)) {
        fail(e, NULL, "the top level must be a JSON object");
        goto out_free;
    }
    if (!(c = calloc(1, sizeof(*c)))) {
        fail(e, NULL, "out of memory");
        goto out_free;
    }
    if (file && !(c->path = strdup(file))) {
        fail(e, NULL, "out of memory");
        goto out_free;
    }
    json_object_foreach(root, key, v)
    {
        int known = !strcmp(key, "kafka") || !strcmp(key, "providers") || !strcmp(key, "routes");

        for (size_t i = 0; !known && i < NPROPS(sections); i++)
            known = !strcmp(key, sections[i].name);
        if (!known) {
            fail(e, key, "unknown key");
            goto out_free;
        }
    }
    if (expand_tree(root, "", e))
        goto out_free;

    for (size_t i = 0; i < NPROPS(sections); i++) {
        const section_t *s = &sections[i];

        if (props_defaults(s->props, s->n, c, e))
            goto out_free;
        if (!(v = json_object_get(root, s->name)))
            continue;
        if (!json_is_object(v)) {
            fail(e, s->name, "must be an object");
            goto out_free;
        }
        if (props_apply(s->props, s->n, c, v, s->name, e))
            goto out_free;
    }
    if (!topic_chars_ok(c->topic_prefix) || strlen(c->topic_prefix) > 100) {
        fail(e, "topics.prefix", "must be at most 100 characters of [A-Za-z0-9._-]");
        goto out_free;
    }
    if (load_kafka(c, json_object_get(root, "kafka"), e) || load_redis_url(c, e) ||
        parse_listen(c, e) || default_instance_id(c, e) ||
        load_providers(c, json_object_get(root, "providers"), e) ||
        load_routes(c, json_object_get(root, "routes"), e) || check_callbacks(c, e))
        goto out_free;
    json_decref(root);
    return c;

out_free:
    pq_conf_destroy(c);
    json_decref(root);
    return NULL;
}

/* ---- public ----------------------------------------------------------------------------- */

pq_conf_t *pq_conf_load_str(const char *json, size_t len, char *errstr, size_t errstr_size)
{
    cerr_t e = {errstr, errstr_size};

    return conf_from_text(json, len, NULL, &e);
}

pq_conf_t *pq_conf_load(const char *path, char *errstr, size_t errstr_size)
{
    cerr_t e = {errstr, errstr_size};
    pq_conf_t *c;
    size_t len;
    char *text;

    if (!(text = pq_file_read(path, CONF_MAX_FILE, &len))) {
        if (errno == EFBIG)
            fail(&e, NULL, "cannot read: larger than %d bytes", CONF_MAX_FILE);
        else
            fail(&e, NULL, "cannot read: %s", strerror(errno));
        return NULL;
    }
    c = conf_from_text(text, len, path, &e);
    free(text);
    return c;
}

void pq_conf_destroy(pq_conf_t *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < NPROPS(sections); i++)
        props_free(sections[i].props, sections[i].n, c);
    kv_free(c->kafka, c->nkafka);
    free(c->redis_host);
    free(c->redis_password);
    free(c->listen_host);
    for (size_t i = 0; i < c->nproviders; i++) {
        props_free(provider_props, NPROPS(provider_props), &c->providers[i]);
        free(c->providers[i].name);
    }
    free(c->providers);
    for (size_t i = 0; i < c->nroutes; i++) {
        pq_route_t *r = &c->routes[i];

        for (size_t j = 0; j < r->ntargets; j++)
            props_free(target_props, NPROPS(target_props), &r->targets[j]);
        props_free(route_props, NPROPS(route_props), r);
        free(r->targets);
        free(r->name);
        free(r->topic_name);
    }
    free(c->routes);
    free(c->path);
    free(c);
}

int pq_target_prefill(const pq_target_t *t)
{
    if (t->supports_prefill >= 0)
        return t->supports_prefill;
    return t->p && t->p->supports_prefill;
}

const pq_route_t *pq_conf_route(const pq_conf_t *conf, const char *name)
{
    for (size_t i = 0; conf && name && i < conf->nroutes; i++)
        if (!strcmp(conf->routes[i].name, name))
            return &conf->routes[i];
    return NULL;
}

const pq_provider_conf_t *pq_conf_provider(const pq_conf_t *conf, const char *name)
{
    for (size_t i = 0; conf && name && i < conf->nproviders; i++)
        if (conf->providers[i].name && !strcmp(conf->providers[i].name, name))
            return &conf->providers[i];
    return NULL;
}

const char *pq_conf_kafka_get(const pq_conf_t *conf, const char *key)
{
    for (size_t i = 0; conf && key && i < conf->nkafka; i++)
        if (!strcmp(conf->kafka[i].key, key))
            return conf->kafka[i].value;
    return NULL;
}

void pq_conf_topic(const pq_conf_t *conf, const char *name, char *buf, size_t size)
{
    snprintf(buf, size, "%s%s", conf->topic_prefix ? conf->topic_prefix : "", name);
}

void pq_conf_retry_topic(const pq_conf_t *conf, const pq_route_t *route, char *buf, size_t size)
{
    snprintf(buf, size, "%sretry.%s", conf->topic_prefix ? conf->topic_prefix : "",
             route->topic_name);
}

static const char *type_name(ptype_t t)
{
    switch (t) {
    case PT_INT:
    case PT_I64:
        return "integer";
    case PT_BOOL:
        return "boolean";
    case PT_DBL:
        return "number";
    case PT_STR:
    case PT_STR1:
        return "string";
    case PT_ENUM:
        return "enum";
    case PT_STRLIST:
        return "list of strings";
    case PT_KVMAP:
        return "object of strings";
    }
    return "?";
}

static void print_props(FILE *out, const char *section, const prop_t *t, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const prop_t *p = &t[i];
        char def[64] = "", range[64] = "";

        switch (p->type) {
        case PT_INT:
        case PT_I64:
            snprintf(def, sizeof(def), "%lld", (long long)p->idef);
            snprintf(range, sizeof(range), "%lld..%lld", (long long)p->imin, (long long)p->imax);
            break;
        case PT_BOOL:
            snprintf(def, sizeof(def), "%s", p->idef ? "true" : "false");
            break;
        case PT_DBL:
            snprintf(def, sizeof(def), "%g", p->ddef);
            snprintf(range, sizeof(range), "%g..%g", p->dmin, p->dmax);
            break;
        case PT_ENUM:
            enum_list(p->enums, range, sizeof(range));
            /* fall through */
        case PT_STR:
            if (p->sdef)
                snprintf(def, sizeof(def), "\"%s\"", p->sdef);
            break;
        default:
            break;
        }
        fprintf(out, "| %s.%s | %s | %s | %s | %s%s |\n", section, p->name, type_name(p->type), def,
                range, (p->flags & PF_REQUIRED) ? "required. " : "", p->desc);
    }
}

void pq_conf_print_reference(FILE *out)
{
    fprintf(out, "| property | type | default | range | description |\n"
                 "| --- | --- | --- | --- | --- |\n"
                 "| kafka.* | string | bootstrap.servers \"" DEFAULT_BOOTSTRAP "\" | | "
                 "librdkafka properties, passed through (some are refused) |\n");
    for (size_t i = 0; i < NPROPS(sections); i++)
        print_props(out, sections[i].name, sections[i].props, sections[i].n);
    print_props(out, "providers.NAME", provider_props, NPROPS(provider_props));
    print_props(out, "routes.NAME", route_props, NPROPS(route_props));
    print_props(out, "routes.NAME.targets.N", target_props, NPROPS(target_props));
}

int pq_conf_route_budget_ms(const pq_conf_t *conf, const pq_route_t *route)
{
    if (route->budget_ms > 0)
        return route->budget_ms;
    return conf->sync_timeout_ms > 2000 ? conf->sync_timeout_ms - 1000 : conf->sync_timeout_ms;
}

/* The longest one call to t can take when the provider accepts and never answers. */
static int64_t silent_attempt_ms(const pq_target_t *t)
{
    const pq_timeouts_t *o = &t->timeouts;

    return o->first_byte_ms > 0 && o->first_byte_ms < o->total_ms ? o->first_byte_ms : o->total_ms;
}

/* A worker holds worker.max_inflight jobs, but each provider takes at most max_concurrency calls
 * of one worker process at once: when the providers its routes use (each counted once) take
 * fewer in total, the rest of the jobs wait inside the worker for a provider slot, and
 * max_concurrency, not max_inflight, sets the worker's throughput. 0 = unlimited. */
static int route_uses(const pq_conf_t *conf, const pq_provider_conf_t *p)
{
    for (size_t i = 0; i < conf->nroutes; i++)
        for (size_t k = 0; k < conf->routes[i].ntargets; k++)
            if (conf->routes[i].targets[k].p == p)
                return 1;
    return 0;
}

static int warn_concurrency(const pq_conf_t *conf, FILE *out, const char *prefix)
{
    long long sum = 0;
    size_t nused = 0, len = 0;
    char names[256] = "";

    for (size_t i = 0; i < conf->nproviders; i++) {
        const pq_provider_conf_t *p = &conf->providers[i];
        if (!route_uses(conf, p))
            continue;
        if (p->max_concurrency <= 0)
            return 0; /* unlimited: max_inflight is the bound */
        sum += p->max_concurrency;
        nused++;
        if (len < sizeof(names) - 1) {
            int w = snprintf(names + len, sizeof(names) - len, "%s%s %d", len ? ", " : "", p->name,
                             p->max_concurrency);
            len = w < 0 || (size_t)w >= sizeof(names) - len ? sizeof(names) - 1 : len + (size_t)w;
        }
    }
    if (nused == 0 || sum >= conf->max_inflight)
        return 0;
    fprintf(out,
            "%sworker.max_inflight (%d) is above the max_concurrency of the routes' providers "
            "summed (%lld: %s): a worker never has more than %lld calls in flight and its other "
            "jobs wait inside it for a provider slot; raise max_concurrency (0 = unlimited) or "
            "lower worker.max_inflight to %lld\n",
            prefix, conf->max_inflight, sum, names, sum, sum);
    return 1;
}

int pq_conf_warn(const pq_conf_t *conf, FILE *out, const char *prefix)
{
    int n = 0;

    for (size_t i = 0; i < conf->nroutes; i++) {
        const pq_route_t *r = &conf->routes[i];
        int64_t worst = 0;

        for (size_t k = 0; k < r->ntargets; k++) {
            const pq_target_t *t = &r->targets[k];
            worst +=
                silent_attempt_ms(t) * (t->p->retry_on_timeout ? 1 + t->p->retries_per_target : 1);
        }
        /* a one-target route has nothing to fail over to: its client's 504 names the job */
        if (r->ntargets > 1 && worst > conf->sync_timeout_ms) {
            fprintf(out,
                    "%sroutes.%s: silent providers could take %" PRId64
                    " ms over its %zu target(s), more than broker.sync_timeout_ms (%d): "
                    "interactive calls are cut to the route's budget (%d ms, keeping "
                    "reserve_ms %d for later targets); lower the targets' "
                    "first_byte_timeout_ms or timeout_ms to fit\n",
                    prefix, r->name, worst, r->ntargets, conf->sync_timeout_ms,
                    pq_conf_route_budget_ms(conf, r), r->reserve_ms);
            n++;
        }
    }
    n += warn_concurrency(conf, out, prefix);
    return n;
}

int pq_conf_cli_skip(int argc, char **argv, int i)
{
    if (i <= 0 || i >= argc || !argv[i])
        return 0;
    if (!strcmp(argv[i], "--config"))
        return i + 1 < argc ? 2 : 1;
    if (!strncmp(argv[i], "--config=", 9) || !strcmp(argv[i], "--check-config") ||
        !strcmp(argv[i], "--config-help") || !strcmp(argv[i], "--print-config-reference"))
        return 1;
    return 0;
}

const char *pq_conf_path_from_args(int argc, char **argv)
{
    const char *env;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config"))
            return i + 1 < argc ? argv[i + 1] : NULL;
        if (!strncmp(argv[i], "--config=", 9))
            return argv[i] + 9;
    }
    env = getenv("PROMPTQ_CONFIG");
    return env && *env ? env : NULL;
}

int pq_conf_cli(int argc, char **argv, const char *prog, pq_conf_t **out)
{
    int check = 0;
    const char *path;
    char err[1024];
    pq_conf_t *c;

    *out = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--check-config"))
            check = 1;
        /* --print-config-reference: the same table, the name docs/gen-configuration.sh uses */
        if (!strcmp(argv[i], "--config-help") || !strcmp(argv[i], "--print-config-reference")) {
            pq_conf_print_reference(stdout);
            fflush(stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--config") && i + 1 >= argc) {
            fprintf(stderr, "%s: --config needs a PATH\n", prog);
            return 2;
        }
        if (!strcmp(argv[i], "--config=")) {
            fprintf(stderr, "%s: --config needs a PATH\n", prog);
            return 2;
        }
    }
    if (!(path = pq_conf_path_from_args(argc, argv))) {
        fprintf(stderr, "%s: no config file: pass --config PATH or set PROMPTQ_CONFIG\n", prog);
        return 2;
    }
    if (!(c = pq_conf_load(path, err, sizeof(err)))) {
        fprintf(stderr, "%s: %s: %s\n", prog, path, err);
        return 1;
    }
    if (check) {
        char prefix[CONF_PATH_MAX + 16];

        snprintf(prefix, sizeof(prefix), "%s: warning: ", path);
        pq_conf_warn(c, stdout, prefix);
        printf("%s: OK\n", path);
        fflush(stdout);
        pq_conf_destroy(c);
        return 0;
    }
    pq_log_init(prog, (pq_log_level_t)pq_log_level_parse(c->log_level), c->log_json);
    *out = c;
    return PQ_CONF_CLI_RUN;
}
