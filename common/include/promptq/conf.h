/* Configuration: one JSON file (DESIGN.md §6), validated against a table of properties.
 *
 * The loaded pq_conf_t is read-only after pq_conf_load() returns; SIGHUP loads a new one and
 * swaps it in. All strings are owned by the conf. */
#ifndef PROMPTQ_CONF_H
#define PROMPTQ_CONF_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct pq_kv_s {
    char *key;
    char *value;
} pq_kv_t;

/* The watsonx API version date a provider uses when its config names none. */
#define PQ_WATSONX_VERSION_DEFAULT "2025-02-06"

typedef struct pq_provider_conf_s {
    char *name;     /* key in "providers" */
    char *type;     /* openai | azure_openai | anthropic | gemini | watsonx */
    char *base_url; /* no trailing slash */
    char **api_keys;
    size_t napi_keys; /* 0 for a local server */
    pq_kv_t *headers; /* extra request headers */
    size_t nheaders;
    int timeout_ms;            /* total, default 60000 */
    int connect_timeout_ms;    /* default 10000 */
    int first_byte_timeout_ms; /* until the answer's first byte; 0 = timeout_ms */
    int idle_timeout_ms;       /* longest gap between bytes of an answer; 0 = none */
    int retry_on_timeout;      /* a timeout retries the same target; default 0 = next target */
    int max_rest_ms;           /* cap of a 429's rest (Retry-After), default 60000 */
    int max_concurrency;       /* default 256; 0 = unlimited */
    int rpm;                   /* requests per minute, 0 = unlimited */
    int tpm;                   /* tokens per minute, 0 = unlimited */
    int retries_per_target;    /* default 2 */
    int max_retry_wait_ms;     /* default 10000 */
    int retry_base_ms;         /* backoff base, default 200 */
    int retry_max_ms;          /* backoff cap, default 5000 */
    int key_rest_ms;         /* a key that answered 401 (or a key-wide quota error) rests this long,
                                default 30000 */
    int circuit_failures;    /* consecutive failures that open the circuit, default 5 */
    double circuit_ratio;    /* failure ratio over the window that opens it, default 0.5 */
    int circuit_window;      /* calls in the ratio window, default 20 */
    int circuit_cooldown_ms; /* open -> half-open, default 5000 */
    int probe_interval_ms;   /* default 5000 (at most 5000) */
    char *probe;             /* "completion" (default) | "models" */
    char *half_open;         /* "probe" (default): the worker's probe tests a half-open circuit;
                                "call": the next job's real call does */
    int supports_prefill;    /* continues a trailing assistant message (an assistant prefill):
                              * a stream cut after chunks went out continues here; default 0 */
    char *stream_malformed;  /* a malformed event of a streamed answer: "failover" (default):
                                the attempt fails (the next target, or a restart); "skip": the
                                event is dropped and the stream goes on */
    char *status_url;        /* statuspage.io status.json, or NULL */
    char *api_version;       /* azure_openai (not needed with azure_api "v1") */
    char *azure_api;         /* azure_openai: "deployments" (default):
                                /openai/deployments/{model}/...?api-version=; "v1":
                                /openai/v1/chat/completions with the model in the body */
    char *project_id;        /* watsonx: the project, or NULL when space_id is given */
    char *space_id;          /* watsonx: the deployment space, or NULL when project_id is */
    char *watsonx_version;   /* watsonx chat ?version= (YYYY-MM-DD), default
                                PQ_WATSONX_VERSION_DEFAULT */
    char *iam_url;           /* watsonx */
    char *ca_file;           /* PEM CA certificates trusted for base_url instead of the
                                system's (a private CA, a TLS-inspecting proxy), or NULL */
    int default_max_tokens;  /* anthropic, default 4096 */
} pq_provider_conf_t;

/* Timeouts of one call (ms; 0 = none), resolved from a target and its provider. */
typedef struct pq_timeouts_s {
    int connect_ms, first_byte_ms, idle_ms, total_ms;
} pq_timeouts_t;

typedef struct pq_target_s {
    char *provider; /* key in "providers" */
    char *model;
    const pq_provider_conf_t *p; /* resolved at load */
    int64_t max_context_tokens;  /* context window; 0 = not given */
    pq_timeouts_t timeouts;      /* the target's own, else its provider's (resolved at load) */
    int supports_prefill;        /* -1: the provider's; 0/1 this target's (pq_target_prefill) */
} pq_target_t;

typedef enum { PQ_BAD_REQUEST_NEXT_PROVIDER = 0, PQ_BAD_REQUEST_END } pq_bad_request_t;

typedef struct pq_route_s {
    char *name;       /* the model name clients ask for */
    char *topic_name; /* sanitised for Kafka topic names (without prefix) */
    pq_target_t *targets;
    size_t ntargets;
    pq_bad_request_t on_bad_request; /* a 400/422 refusal: try another provider, or end */
    char *on_bad_request_name;       /* "next_provider" | "end" (the config's text) */
    int budget_ms;  /* interactive calls a client waits for: the attempt chain's budget from
                       acceptance; 0 = broker.sync_timeout_ms - 1000 */
    int reserve_ms; /* of the budget, kept for later targets when an attempt is cut to fit;
                       default 10000 */
} pq_route_t;

typedef struct pq_conf_s {
    char *path; /* file it came from, or NULL */

    /* kafka: pass-through librdkafka properties (bootstrap.servers included, after the
     * PROMPTQ_KAFKA_BOOTSTRAP override) */
    pq_kv_t *kafka;
    size_t nkafka;
    const char *bootstrap; /* borrowed from kafka[] */

    /* topics */
    char *topic_prefix;   /* "promptq." */
    int topic_partitions; /* for topics promptq creates, default 4 */

    /* redis */
    char *redis_url;  /* after the PROMPTQ_REDIS_URL override */
    char *redis_host; /* parsed from redis_url */
    int redis_port;
    int redis_db;
    char *redis_password; /* or NULL */
    char *redis_prefix;   /* "promptq:" */
    int64_t result_ttl_s;
    int64_t cache_ttl_s;        /* default 86400 */
    int cache_temperature_zero; /* cache temperature-0 requests by default; default 0 */

    /* broker */
    char *listen;      /* "127.0.0.1:8080" */
    char *listen_host; /* parsed from listen ("0.0.0.0" when the host part is empty) */
    int listen_port;   /* parsed from listen; 0 = any free port */
    int broker_threads;
    char *spool_dir;
    int64_t spool_max_bytes; /* default 1 GiB */
    pq_kv_t *api_keys;       /* key -> tenant; empty = open */
    size_t napi_keys;
    char **admin_tenants; /* tenants whose keys may make route-wide requests (parked replay) */
    size_t nadmin_tenants;
    int sync_timeout_ms;
    int ack_timeout_ms;
    int64_t max_body_bytes;    /* 0 = derived from message.max.bytes */
    int max_prompt_bytes;      /* default 1 MiB */
    int backlog;               /* listen backlog, default 4096 */
    char *instance_id;         /* default hostname-pid */
    int64_t idempotency_ttl_s; /* Idempotency-Key lifetime, default 86400 */
    double tenant_rps;         /* per-tenant request rate (token bucket); 0 = unlimited */
    int tenant_burst;          /* bucket size; 0 = max(1, ceil(tenant_rps)) */
    int64_t max_file_bytes;    /* POST /v1/files cap, default 100 MiB, at most 256 MiB */
    int max_batch_lines;       /* request lines per batch, default 50000 */

    /* worker */
    int max_inflight;
    char *group_id;
    int64_t park_ttl_s;
    int64_t max_response_bytes;
    int max_deliveries; /* redeliveries before a job is poison, default 5 */
    int lease_ms;       /* default 30000 */
    int max_attempts;   /* provider calls per job per pass over its route, default 10 */
    /* "HOST:PORT" for GET /metrics and /healthz; "" = off */
    char *metrics_listen;

    /* callbacks: callback_url POSTs (sent by workers; the broker checks them at intake) */
    char **callback_hosts; /* allow-list: "host", "*.domain", either with ":port"; empty = none */
    size_t ncallback_hosts;
    pq_kv_t *callback_secrets; /* tenant -> HMAC secret ("*": any other tenant) */
    size_t ncallback_secrets;
    int callback_timeout_ms;     /* one POST, default 10000 */
    int callback_max_attempts;   /* then the callback is failed, default 12 */
    int callback_backoff_ms;     /* first retry delay, doubling, default 1000 */
    int callback_max_backoff_ms; /* retry delay cap, default 600000 */
    int callback_max_inflight;   /* POSTs in flight per worker, default 64 */
    int callback_poll_ms;        /* how often a worker looks for due callbacks, default 500 */
    /* log */
    char *log_level; /* "info" */
    int log_json;

    pq_provider_conf_t *providers;
    size_t nproviders;
    pq_route_t *routes;
    size_t nroutes;
} pq_conf_t;

/* Loads and validates a config file. ${VAR} in any string is replaced from the environment (an
 * unset variable is an error naming it); PROMPTQ_KAFKA_BOOTSTRAP and PROMPTQ_REDIS_URL override
 * the file. Unknown keys and bad values are errors naming their JSON path, e.g.
 * "providers.openai.rpmm: unknown key". Returns a new conf, or NULL with errstr set. */
pq_conf_t *pq_conf_load(const char *path, char *errstr, size_t errstr_size);

/* Same, from a JSON text (tests). */
pq_conf_t *pq_conf_load_str(const char *json, size_t len, char *errstr, size_t errstr_size);

void pq_conf_destroy(pq_conf_t *conf);

/* Warnings about a loaded config that still runs (e.g. a route whose worst-case attempt chain
 * for a silent provider exceeds broker.sync_timeout_ms): one line each into out, prefixed by
 * prefix. Returns how many. */
int pq_conf_warn(const pq_conf_t *conf, FILE *out, const char *prefix);

/* The budget of a route's interactive calls in ms (route budget_ms, else derived from
 * broker.sync_timeout_ms). */
int pq_conf_route_budget_ms(const pq_conf_t *conf, const pq_route_t *route);

/* Finds a route or provider by name; NULL if absent. Borrowed. */
/* worker.metrics_listen's default: on, loopback only. */
#define PQ_WORKER_METRICS_DEFAULT "127.0.0.1:9464"

const pq_route_t *pq_conf_route(const pq_conf_t *conf, const char *name);
/* 1 if target continues an assistant prefill (its own supports_prefill, else its provider's). */
int pq_target_prefill(const pq_target_t *t);
const pq_provider_conf_t *pq_conf_provider(const pq_conf_t *conf, const char *name);

/* Value of a kafka pass-through property, or NULL. Borrowed. */
const char *pq_conf_kafka_get(const pq_conf_t *conf, const char *key);

/* Resolves the config path for a program: --config PATH from argv, else $PROMPTQ_CONFIG.
 * Returns NULL if neither is given. Borrowed from argv or the environment. */
const char *pq_conf_path_from_args(int argc, char **argv);

/* Writes "<prefix><name>" (e.g. "promptq.requests") into buf. */
void pq_conf_topic(const pq_conf_t *conf, const char *name, char *buf, size_t size);

/* Writes the retry topic of a route ("promptq.retry.<sanitised route>") into buf. */
void pq_conf_retry_topic(const pq_conf_t *conf, const pq_route_t *route, char *buf, size_t size);

/* Parses "redis://[:password@]host[:port][/db]" (host may be "[v6addr]"; the password is
 * percent-decoded; port defaults to 6379, db to 0). Pure. Returns 0 with *host and *password
 * new strings (*password NULL when absent), or -1 with errstr set. The URL is never copied into
 * errstr: it may hold a password. */
int pq_conf_parse_redis_url(const char *url, char **host, int *port, int *db, char **password,
                            char *errstr, size_t errstr_size);

/* Command-line helper shared by every program:
 *
 *     int main(int argc, char **argv)
 *     {
 *         pq_conf_t *conf;
 *         int rc = pq_conf_cli(argc, argv, "promptq-worker", &conf);
 *         if (rc != PQ_CONF_CLI_RUN)
 *             return rc;
 *         ... run with conf, pq_conf_destroy(conf) at the end ...
 *     }
 *
 * Looks for "--config PATH" / "--config=PATH" (else $PROMPTQ_CONFIG) and "--check-config"
 * anywhere in argv, without modifying argv; other arguments are the program's own (skip the
 * config ones with pq_conf_cli_skip()). Outcomes:
 *   - no config given: prints "<prog>: no config file: pass --config PATH or set
 *     PROMPTQ_CONFIG" to stderr, returns 2;
 *   - --config without a value: usage error on stderr, returns 2;
 *   - the config does not load: prints "<prog>: <path>: <error>" to stderr, returns 1;
 *   - --config-help (or its alias --print-config-reference): prints pq_conf_print_reference()
 *     to stdout, returns 0 (docs/configuration.md is generated from it);
 *   - --check-config and the config loads: prints "<path>: OK" to stdout, returns 0;
 *   - otherwise: calls pq_log_init(prog, log.level, log.json), sets *out to the new conf (the
 *     caller owns it) and returns PQ_CONF_CLI_RUN.
 * *out is NULL unless PQ_CONF_CLI_RUN is returned. */
#define PQ_CONF_CLI_RUN (-1)
int pq_conf_cli(int argc, char **argv, const char *prog, pq_conf_t **out);

/* How many argv entries starting at argv[i] belong to pq_conf_cli's flags: 2 for "--config
 * PATH", 1 for "--config=PATH", "--check-config", "--config-help", "--print-config-reference"
 * (or a trailing "--config"), 0 otherwise. For programs that parse the rest of argv themselves. */
int pq_conf_cli_skip(int argc, char **argv, int i);

/* Prints every property (name, type, default, range, description) as a Markdown table, from the
 * same tables the loader validates with. */
void pq_conf_print_reference(FILE *out);

#endif
