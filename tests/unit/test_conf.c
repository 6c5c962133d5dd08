/* Config loader: good configs load with the right values and defaults; every case under
 * tests/data/conf/bad/<case>.json fails with the error in <case>.err (a substring) and no
 * secret in it; env overrides; kafka conf per role; CLI helper. */
#include <dirent.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "promptq/conf.h"
#include "promptq/kafka.h"
#include "promptq/util.h"

/* Every secret the tests put in the environment contains this marker; no error may. */
#define SECRET_MARK "SECRET"

static char data_dir[1024];

static void data_path(char *buf, size_t size, const char *rel)
{
    snprintf(buf, size, "%s/conf/%s", data_dir, rel);
}

static int setup(void **state)
{
    const char *d = getenv("PQ_TEST_DATA");

    (void)state;
    snprintf(data_dir, sizeof(data_dir), "%s", d ? d : "tests/data");
    setenv("OPENAI_API_KEY", "sk-SECRET-openai", 1);
    setenv("ANTHROPIC_API_KEY", "sk-ant-SECRET", 1);
    setenv("GEMINI_API_KEY", "gem-SECRET", 1);
    setenv("AZURE_OPENAI_KEY", "az-SECRET", 1);
    setenv("WATSONX_APIKEY", "wx-SECRET", 1);
    setenv("PQ_TEST_SECRET", "hunter2-SECRET-value", 1);
    setenv("PQ_TEST_EMPTY", "", 1);
    setenv("PQ_TEST_HOST", "127.0.0.1", 1);
    setenv("PQ_TEST_PORT", "18080", 1);
    unsetenv("PQ_TEST_UNSET_VAR");
    unsetenv("PROMPTQ_KAFKA_BOOTSTRAP");
    unsetenv("PROMPTQ_REDIS_URL");
    unsetenv("PROMPTQ_CONFIG");
    return 0;
}

static pq_conf_t *load_good(const char *name)
{
    char path[1200], err[512] = "";
    pq_conf_t *c;

    data_path(path, sizeof(path), name);
    c = pq_conf_load(path, err, sizeof(err));
    if (!c)
        print_error("%s: %s\n", name, err);
    assert_non_null(c);
    assert_string_equal(c->path, path);
    return c;
}

static pq_conf_t *load_str(const char *json, char *err, size_t size)
{
    err[0] = '\0';
    return pq_conf_load_str(json, strlen(json), err, size);
}

static void test_full_example(void **state)
{
    pq_conf_t *c = load_good("good/full.json");
    const pq_provider_conf_t *p;
    const pq_route_t *r;
    char topic[256];

    (void)state;
    assert_string_equal(c->bootstrap, "127.0.0.1:9092");
    assert_string_equal(pq_conf_kafka_get(c, "bootstrap.servers"), "127.0.0.1:9092");
    assert_null(pq_conf_kafka_get(c, "linger.ms"));
    assert_string_equal(c->topic_prefix, "promptq.");
    assert_string_equal(c->redis_host, "127.0.0.1");
    assert_int_equal(c->redis_port, 6379);
    assert_int_equal(c->redis_db, 0);
    assert_null(c->redis_password);
    assert_string_equal(c->redis_prefix, "promptq:");
    assert_int_equal(c->result_ttl_s, 604800);
    assert_string_equal(c->listen, "127.0.0.1:8080");
    assert_string_equal(c->listen_host, "127.0.0.1");
    assert_int_equal(c->listen_port, 8080);
    assert_int_equal(c->broker_threads, 2);
    assert_string_equal(c->spool_dir, "./spool");
    assert_int_equal(c->napi_keys, 1);
    assert_string_equal(c->api_keys[0].key, "KEY");
    assert_string_equal(c->api_keys[0].value, "tenant");
    assert_int_equal(c->sync_timeout_ms, 50000);
    assert_int_equal(c->ack_timeout_ms, 1000);
    assert_int_equal(c->max_inflight, 4096);
    assert_string_equal(c->group_id, "promptq-workers");
    assert_int_equal(c->park_ttl_s, 86400);
    assert_int_equal(c->max_response_bytes, 4194304);

    assert_int_equal(c->nproviders, 6);
    assert_string_equal(c->providers[0].name, "openai"); /* file order kept */
    assert_string_equal(c->providers[5].name, "local");
    p = pq_conf_provider(c, "openai");
    assert_non_null(p);
    assert_string_equal(p->type, "openai");
    assert_string_equal(p->base_url, "https://api.openai.com/v1");
    assert_int_equal(p->napi_keys, 1);
    assert_string_equal(p->api_keys[0], "sk-SECRET-openai");
    assert_int_equal(p->rpm, 5000);
    assert_int_equal(p->tpm, 2000000);
    p = pq_conf_provider(c, "claude");
    assert_string_equal(p->type, "anthropic");
    assert_int_equal(p->napi_keys, 1);
    assert_string_equal(p->api_keys[0], "sk-ant-SECRET");
    assert_int_equal(p->default_max_tokens, 4096);
    p = pq_conf_provider(c, "azure");
    assert_string_equal(p->type, "azure_openai");
    assert_string_equal(p->api_version, "2024-10-21");
    assert_string_equal(p->azure_api, "deployments");
    assert_string_equal(p->api_keys[0], "az-SECRET");
    p = pq_conf_provider(c, "watson");
    assert_string_equal(p->type, "watsonx");
    assert_string_equal(p->project_id, "...");
    assert_null(p->space_id);
    assert_string_equal(p->watsonx_version, PQ_WATSONX_VERSION_DEFAULT);
    assert_string_equal(p->iam_url, "https://iam.cloud.ibm.com/identity/token");
    p = pq_conf_provider(c, "local");
    assert_int_equal(p->napi_keys, 0);
    assert_null(p->api_keys);
    assert_string_equal(p->base_url, "http://127.0.0.1:11434/v1");
    assert_null(pq_conf_provider(c, "nope"));

    assert_int_equal(c->nroutes, 1);
    r = pq_conf_route(c, "gpt-4o-mini");
    assert_non_null(r);
    assert_null(pq_conf_route(c, "gpt-4o"));
    assert_string_equal(r->topic_name, "gpt-4o-mini");
    assert_int_equal(r->ntargets, 3);
    assert_string_equal(r->targets[0].provider, "openai");
    assert_string_equal(r->targets[0].model, "gpt-4o-mini");
    assert_ptr_equal(r->targets[1].p, pq_conf_provider(c, "claude"));
    assert_string_equal(r->targets[2].model, "llama3.1");
    pq_conf_retry_topic(c, r, topic, sizeof(topic));
    assert_string_equal(topic, "promptq.retry.gpt-4o-mini");
    pq_conf_topic(c, "requests", topic, sizeof(topic));
    assert_string_equal(topic, "promptq.requests");
    pq_conf_destroy(c);
}

static void test_defaults(void **state)
{
    pq_conf_t *c = load_good("good/minimal.json");
    const pq_provider_conf_t *p = &c->providers[0];
    char host[256], id[300];

    (void)state;
    assert_string_equal(c->bootstrap, "127.0.0.1:9092");
    assert_string_equal(c->topic_prefix, "promptq.");
    assert_int_equal(c->topic_partitions, 4);
    assert_string_equal(c->redis_url, "redis://127.0.0.1:6379/0");
    assert_string_equal(c->redis_host, "127.0.0.1");
    assert_int_equal(c->redis_port, 6379);
    assert_string_equal(c->redis_prefix, "promptq:");
    assert_int_equal(c->result_ttl_s, 604800);
    assert_int_equal(c->cache_ttl_s, 86400);
    assert_int_equal(c->cache_temperature_zero, 0);
    assert_string_equal(c->listen, "127.0.0.1:8080");
    assert_int_equal(c->broker_threads, 2);
    assert_string_equal(c->spool_dir, "./spool");
    assert_int_equal(c->spool_max_bytes, 1024LL * 1024 * 1024);
    assert_int_equal(c->napi_keys, 0);
    assert_int_equal(c->sync_timeout_ms, 50000);
    assert_int_equal(c->ack_timeout_ms, 1000);
    assert_int_equal(c->max_body_bytes, 0);
    assert_int_equal(c->max_prompt_bytes, 1024 * 1024);
    assert_int_equal(c->backlog, 4096);
    assert_int_equal(c->idempotency_ttl_s, 86400);
    assert_int_equal(c->max_file_bytes, 100 * 1024 * 1024);
    assert_int_equal(c->max_batch_lines, 50000);
    assert_true(c->tenant_rps == 0);
    assert_int_equal(c->tenant_burst, 0);
    gethostname(host, sizeof(host));
    snprintf(id, sizeof(id), "%s-%ld", host, (long)getpid());
    assert_string_equal(c->instance_id, id);
    assert_int_equal(c->max_inflight, 4096);
    assert_string_equal(c->group_id, "promptq-workers");
    assert_int_equal(c->park_ttl_s, 86400);
    assert_int_equal(c->max_response_bytes, 4194304);
    assert_int_equal(c->max_deliveries, 5);
    assert_int_equal(c->lease_ms, 30000);
    assert_string_equal(c->metrics_listen, "127.0.0.1:9464"); /* on, loopback only */
    assert_string_equal(c->log_level, "info");
    assert_int_equal(c->log_json, 0);

    assert_string_equal(p->base_url, "http://127.0.0.1:11434/v1"); /* trailing slash cut */
    assert_int_equal(p->timeout_ms, 60000);
    assert_int_equal(p->max_concurrency, 256);
    assert_int_equal(p->rpm, 0);
    assert_int_equal(p->tpm, 0);
    assert_int_equal(p->retries_per_target, 2);
    assert_int_equal(p->max_retry_wait_ms, 10000);
    assert_int_equal(p->retry_base_ms, 200);
    assert_int_equal(p->retry_max_ms, 5000);
    assert_int_equal(p->key_rest_ms, 30000);
    assert_int_equal(p->circuit_failures, 5);
    assert_true(p->circuit_ratio > 0.499 && p->circuit_ratio < 0.501);
    assert_int_equal(p->circuit_window, 20);
    assert_int_equal(p->circuit_cooldown_ms, 5000);
    assert_int_equal(p->probe_interval_ms, 5000);
    assert_string_equal(p->probe, "completion");
    assert_null(p->status_url);
    assert_null(p->api_version);
    assert_null(p->iam_url);
    assert_int_equal(p->default_max_tokens, 4096);
    assert_int_equal(p->nheaders, 0);
    pq_conf_destroy(c);
}

/* Every field set to a non-default value, ${VAR} several per string, $${ escape, sanitising. */
static void test_everything(void **state)
{
    pq_conf_t *c = load_good("good/everything.json");
    const pq_provider_conf_t *p;
    const pq_route_t *r;
    char topic[256];

    (void)state;
    assert_string_equal(c->bootstrap, "10.1.1.1:9092,10.1.1.2:9092");
    assert_string_equal(pq_conf_kafka_get(c, "client.id"), "pq-test");
    assert_string_equal(pq_conf_kafka_get(c, "sasl.password"), "hunter2-SECRET-value");
    assert_string_equal(c->topic_prefix, "acme.pq.");
    assert_int_equal(c->topic_partitions, 12);
    assert_string_equal(c->redis_host, "::1");
    assert_int_equal(c->redis_port, 6390);
    assert_int_equal(c->redis_db, 2);
    assert_string_equal(c->redis_password, "hunter2-SECRET-value");
    assert_string_equal(c->redis_prefix, "acme:");
    assert_int_equal(c->result_ttl_s, 3600);
    assert_int_equal(c->cache_ttl_s, 60);
    assert_int_equal(c->cache_temperature_zero, 1);
    assert_string_equal(c->log_level, "debug");
    assert_int_equal(c->log_json, 1);
    assert_string_equal(c->listen_host, "0.0.0.0");
    assert_int_equal(c->listen_port, 0);
    assert_int_equal(c->broker_threads, 4);
    assert_string_equal(c->spool_dir, "/tmp/pq-spool");
    assert_int_equal(c->spool_max_bytes, 10485760);
    assert_int_equal(c->napi_keys, 2);
    assert_string_equal(c->api_keys[0].key, "hunter2-SECRET-value");
    assert_string_equal(c->api_keys[0].value, "acme");
    assert_string_equal(c->api_keys[1].key, "k2-${literal}");
    assert_int_equal(c->sync_timeout_ms, 1500);
    assert_int_equal(c->ack_timeout_ms, 200);
    assert_int_equal(c->max_body_bytes, 2000000);
    assert_int_equal(c->max_prompt_bytes, 500000);
    assert_int_equal(c->backlog, 1024);
    assert_string_equal(c->instance_id, "b-1");
    assert_int_equal(c->max_inflight, 100);
    assert_string_equal(c->group_id, "g1");
    assert_int_equal(c->park_ttl_s, 60);
    assert_int_equal(c->max_response_bytes, 2048);
    assert_int_equal(c->max_deliveries, 3);
    assert_int_equal(c->lease_ms, 5000);

    p = pq_conf_provider(c, "sim");
    assert_string_equal(p->base_url, "http://127.0.0.1:18080/v1");
    assert_int_equal(p->napi_keys, 2);
    assert_string_equal(p->api_keys[0], "k1");
    assert_string_equal(p->api_keys[1], "hunter2-SECRET-value");
    assert_int_equal(p->nheaders, 2);
    assert_string_equal(p->headers[0].key, "X-Team");
    assert_string_equal(p->headers[0].value, "a ${b} c");
    assert_string_equal(p->headers[1].value, "");
    assert_int_equal(p->timeout_ms, 1000);
    assert_int_equal(p->max_concurrency, 0);
    assert_int_equal(p->rpm, 60);
    assert_int_equal(p->tpm, 1000);
    assert_int_equal(p->retries_per_target, 0);
    assert_int_equal(p->max_retry_wait_ms, 0);
    assert_int_equal(p->retry_base_ms, 10);
    assert_int_equal(p->retry_max_ms, 10);
    assert_int_equal(p->key_rest_ms, 0);
    assert_int_equal(p->circuit_failures, 2);
    assert_true(p->circuit_ratio == 1.0);
    assert_int_equal(p->circuit_window, 4);
    assert_int_equal(p->circuit_cooldown_ms, 100);
    assert_int_equal(p->probe_interval_ms, 100);
    assert_string_equal(p->probe, "models");
    assert_string_equal(p->status_url, "http://127.0.0.1:1/api/v2/status.json");
    p = pq_conf_provider(c, "wx");
    assert_string_equal(p->base_url, "https://us-south.ml.cloud.ibm.com");
    assert_string_equal(p->iam_url, "https://iam.cloud.ibm.com/identity/token");
    assert_string_equal(p->project_id, "p-1");

    r = pq_conf_route(c, "meta/llama3:8b x");
    assert_non_null(r);
    assert_string_equal(r->topic_name, "meta_llama3_8b_x");
    pq_conf_retry_topic(c, r, topic, sizeof(topic));
    assert_string_equal(topic, "acme.pq.retry.meta_llama3_8b_x");
    assert_ptr_equal(r->targets[1].p, pq_conf_provider(c, "wx"));
    /* the list form: route defaults; targets inherit their provider's timeouts */
    assert_int_equal(r->on_bad_request, PQ_BAD_REQUEST_NEXT_PROVIDER);
    assert_int_equal(r->budget_ms, 0);
    assert_int_equal(pq_conf_route_budget_ms(c, r),
                     1500); /* sync_timeout_ms 1500: too short to keep a margin */
    assert_int_equal(r->targets[0].timeouts.total_ms, 1000);
    assert_int_equal(r->targets[0].timeouts.connect_ms, 300);
    assert_int_equal(r->targets[0].timeouts.first_byte_ms, 800);
    assert_int_equal(r->targets[0].timeouts.idle_ms, 200);
    assert_int_equal(r->targets[0].max_context_tokens, 0);

    p = pq_conf_provider(c, "sim");
    assert_int_equal(p->retry_on_timeout, 1);
    assert_int_equal(p->max_rest_ms, 7000);
    /* the object form: settings and per-target overrides */
    r = pq_conf_route(c, "policy");
    assert_non_null(r);
    assert_int_equal(r->ntargets, 2);
    assert_int_equal(r->on_bad_request, PQ_BAD_REQUEST_END);
    assert_int_equal(r->budget_ms, 1200);
    assert_int_equal(pq_conf_route_budget_ms(c, r), 1200);
    assert_int_equal(r->reserve_ms, 300);
    assert_int_equal(r->targets[0].max_context_tokens, 8000);
    assert_int_equal(r->targets[0].timeouts.first_byte_ms, 400);
    assert_int_equal(r->targets[0].timeouts.total_ms, 1000);
    assert_int_equal(r->targets[1].max_context_tokens, 128000);
    assert_int_equal(r->targets[1].timeouts.total_ms, 900);
    assert_int_equal(r->targets[1].timeouts.first_byte_ms, 0);
    pq_conf_destroy(c);
}

static char *read_err(const char *path)
{
    size_t len;
    char *s = pq_file_read(path, 4096, &len);

    assert_non_null(s);
    while (len > 0 && (s[len - 1] == '\n' || s[len - 1] == '\r'))
        s[--len] = '\0';
    return s;
}

/* Data-driven: every bad/<case>.json must fail with bad/<case>.err as a substring. */
static void test_bad_cases(void **state)
{
    char dir[1200], path[1400], err[1024];
    struct dirent *de;
    DIR *d;
    int ncases = 0, nfailed = 0;

    (void)state;
    data_path(dir, sizeof(dir), "bad");
    assert_non_null(d = opendir(dir));
    while ((de = readdir(d))) {
        size_t n = strlen(de->d_name);
        char *want;
        pq_conf_t *c;

        if (n < 6 || strcmp(de->d_name + n - 5, ".json"))
            continue;
        ncases++;
        snprintf(path, sizeof(path), "%s/%.*s.err", dir, (int)(n - 5), de->d_name);
        want = read_err(path);
        if (snprintf(path, sizeof(path), "%s/%s", dir, de->d_name) >= (int)sizeof(path)) {
            print_error("%s: path too long\n", de->d_name);
            free(want);
            nfailed++;
            continue;
        }
        err[0] = '\0';
        c = pq_conf_load(path, err, sizeof(err));
        if (c) {
            print_error("%s: loaded, expected error \"%s\"\n", de->d_name, want);
            nfailed++;
            pq_conf_destroy(c);
        } else if (!strstr(err, want)) {
            print_error("%s: error \"%s\", expected \"%s\"\n", de->d_name, err, want);
            nfailed++;
        } else if (strstr(err, SECRET_MARK)) {
            print_error("%s: error leaks a secret: \"%s\"\n", de->d_name, err);
            nfailed++;
        }
        free(want);
    }
    closedir(d);
    assert_true(ncases >= 50);
    assert_int_equal(nfailed, 0);
}

static void test_env_overrides(void **state)
{
    pq_conf_t *c;
    char err[512];

    (void)state;
    setenv("PROMPTQ_KAFKA_BOOTSTRAP", "127.0.0.1:19092", 1);
    setenv("PROMPTQ_REDIS_URL", "redis://:p%40ss@10.0.0.1:6380/3", 1);
    c = load_good("good/full.json");
    assert_string_equal(c->bootstrap, "127.0.0.1:19092");
    assert_string_equal(pq_conf_kafka_get(c, "bootstrap.servers"), "127.0.0.1:19092");
    assert_string_equal(c->redis_url, "redis://:p%40ss@10.0.0.1:6380/3");
    assert_string_equal(c->redis_host, "10.0.0.1");
    assert_int_equal(c->redis_port, 6380);
    assert_int_equal(c->redis_db, 3);
    assert_string_equal(c->redis_password, "p@ss");
    pq_conf_destroy(c);

    /* override applies when the file has no kafka section too */
    c = load_good("good/minimal.json");
    assert_string_equal(c->bootstrap, "127.0.0.1:19092");
    pq_conf_destroy(c);

    /* a bad override names the variable, not the value */
    setenv("PROMPTQ_REDIS_URL", "http://:SECRET@x", 1);
    c = load_str("{\"providers\":{\"p\":{\"type\":\"openai\"}},"
                 "\"routes\":{\"r\":[{\"provider\":\"p\",\"model\":\"m\"}]}}",
                 err, sizeof(err));
    assert_null(c);
    assert_non_null(strstr(err, "PROMPTQ_REDIS_URL: must start with redis://"));
    assert_null(strstr(err, SECRET_MARK));
    unsetenv("PROMPTQ_KAFKA_BOOTSTRAP");
    unsetenv("PROMPTQ_REDIS_URL");
}

/* watsonx takes a deployment space instead of a project, and a version date of its own. */
static void test_watsonx_space(void **state)
{
    char err[512] = "";
    const pq_provider_conf_t *p;
    pq_conf_t *c;

    (void)state;
    c = load_str("{\"providers\":{\"w\":{\"type\":\"watsonx\",\"space_id\":\"s-1\","
                 "\"watsonx_version\":\"2024-05-31\"}},"
                 "\"routes\":{\"r\":[{\"provider\":\"w\",\"model\":\"m\"}]}}",
                 err, sizeof(err));
    assert_non_null(c);
    p = pq_conf_provider(c, "w");
    assert_null(p->project_id);
    assert_string_equal(p->space_id, "s-1");
    assert_string_equal(p->watsonx_version, "2024-05-31");
    pq_conf_destroy(c);
}

/* Azure's v1 API needs no api_version; the deployments API (the default) does. */
static void test_azure_v1(void **state)
{
    char err[512] = "";
    const pq_provider_conf_t *p;
    pq_conf_t *c;

    (void)state;
    c = load_str("{\"providers\":{\"a\":{\"type\":\"azure_openai\",\"azure_api\":\"v1\","
                 "\"base_url\":\"https://x.openai.azure.com\"}},"
                 "\"routes\":{\"r\":[{\"provider\":\"a\",\"model\":\"dep\"}]}}",
                 err, sizeof(err));
    assert_non_null(c);
    p = pq_conf_provider(c, "a");
    assert_string_equal(p->azure_api, "v1");
    assert_null(p->api_version);
    pq_conf_destroy(c);
}

static void test_redis_url(void **state)
{
    static const struct {
        const char *url;
        const char *host;
        int port, db;
        const char *password;
    } ok[] = {
        {"redis://127.0.0.1:6379/0", "127.0.0.1", 6379, 0, NULL},
        {"redis://localhost", "localhost", 6379, 0, NULL},
        {"redis://localhost/", "localhost", 6379, 0, NULL},
        {"redis://h:1/15", "h", 1, 15, NULL},
        {"redis://:pw@h:7000", "h", 7000, 0, "pw"},
        {"redis://:p@w@h/4", "h", 6379, 4, "p@w"},
        {"redis://:a%2Fb@[::1]:6390/2", "::1", 6390, 2, "a/b"},
        {"redis://:@h", "h", 6379, 0, ""},
    };
    static const char *bad[] = {
        "",
        "redis://",
        "redis://:6379",
        "redis://h:0",
        "redis://h:x",
        "redis://h:6379/x",
        "redis://h:6379x",
        "rediss://h",
        "redis://u:p@h",
        "redis://[::1",
        "redis://:%zz@h",
        "tcp://h:6379",
    };
    char err[256];

    (void)state;
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        char *host, *pw;
        int port, db;

        if (pq_conf_parse_redis_url(ok[i].url, &host, &port, &db, &pw, err, sizeof(err)))
            fail_msg("%s: %s", ok[i].url, err);
        assert_string_equal(host, ok[i].host);
        assert_int_equal(port, ok[i].port);
        assert_int_equal(db, ok[i].db);
        if (ok[i].password)
            assert_string_equal(pw, ok[i].password);
        else
            assert_null(pw);
        free(host);
        free(pw);
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char *host, *pw;
        int port, db;

        err[0] = '\0';
        if (!pq_conf_parse_redis_url(bad[i], &host, &port, &db, &pw, err, sizeof(err)))
            fail_msg("%s: accepted", bad[i]);
        assert_true(err[0] != '\0');
        assert_null(host);
        assert_null(pw);
    }
}

static void test_read_errors(void **state)
{
    char err[512];
    pq_conf_t *c;

    (void)state;
    c = pq_conf_load("/nonexistent/promptq.json", err, sizeof(err));
    assert_null(c);
    assert_non_null(strstr(err, "cannot read"));
    /* errstr may be NULL/0 */
    assert_null(pq_conf_load_str("{}", 2, NULL, 0));
    pq_conf_destroy(NULL);
}

static const char *kget(rd_kafka_conf_t *k, const char *key, char *buf, size_t size)
{
    size_t n = size;

    if (rd_kafka_conf_get(k, key, buf, &n) != RD_KAFKA_CONF_OK)
        return "<unset>";
    return buf;
}

static void test_kafka_conf(void **state)
{
    pq_conf_t *c = load_good("good/everything.json");
    rd_kafka_conf_t *k;
    char err[512], buf[256];
    pq_kv_t kv[1];
    pq_conf_t hand;

    (void)state;
    k = pq_kafka_conf_new(c, PQ_KAFKA_PRODUCER, err, sizeof(err));
    assert_non_null(k);
    assert_string_equal(kget(k, "enable.idempotence", buf, sizeof(buf)), "true");
    assert_string_equal(kget(k, "acks", buf, sizeof(buf)), "-1");     /* all */
    assert_string_equal(kget(k, "linger.ms", buf, sizeof(buf)), "7"); /* the user's */
    assert_string_equal(kget(k, "client.id", buf, sizeof(buf)), "pq-test");
    assert_string_equal(kget(k, "bootstrap.servers", buf, sizeof(buf)),
                        "10.1.1.1:9092,10.1.1.2:9092");
    rd_kafka_conf_destroy(k);

    k = pq_kafka_conf_new(c, PQ_KAFKA_CONSUMER, err, sizeof(err));
    assert_non_null(k);
    assert_string_equal(kget(k, "enable.auto.offset.store", buf, sizeof(buf)), "false");
    assert_string_equal(kget(k, "enable.auto.commit", buf, sizeof(buf)), "true");
    assert_string_equal(kget(k, "enable.partition.eof", buf, sizeof(buf)), "false");
    assert_string_equal(kget(k, "auto.offset.reset", buf, sizeof(buf)), "smallest");
    assert_string_equal(kget(k, "group.id", buf, sizeof(buf)), "g1");
    assert_string_equal(kget(k, "topic.metadata.refresh.interval.ms", buf, sizeof(buf)), "5000");
    assert_string_equal(kget(k, "auto.commit.interval.ms", buf, sizeof(buf)), "1000");
    assert_string_equal(kget(k, "client.id", buf, sizeof(buf)), "pq-test");
    rd_kafka_conf_destroy(k);
    pq_conf_destroy(c);

    c = load_good("good/minimal.json");
    k = pq_kafka_conf_new(c, PQ_KAFKA_PRODUCER, err, sizeof(err));
    assert_non_null(k);
    assert_string_equal(kget(k, "linger.ms", buf, sizeof(buf)), "1");
    rd_kafka_conf_destroy(k);
    pq_conf_destroy(c);

    /* a value under the cap is kept */
    c = load_str("{\"kafka\":{\"topic.metadata.refresh.interval.ms\":\"1000\"},"
                 "\"providers\":{\"p\":{\"type\":\"openai\"}},"
                 "\"routes\":{\"r\":[{\"provider\":\"p\",\"model\":\"m\"}]}}",
                 err, sizeof(err));
    assert_non_null(c);
    k = pq_kafka_conf_new(c, PQ_KAFKA_CONSUMER, err, sizeof(err));
    assert_non_null(k);
    assert_string_equal(kget(k, "topic.metadata.refresh.interval.ms", buf, sizeof(buf)), "1000");
    rd_kafka_conf_destroy(k);
    pq_conf_destroy(c);

    /* the user's commit interval replaces promptq's */
    c = load_str("{\"kafka\":{\"auto.commit.interval.ms\":\"250\"},"
                 "\"providers\":{\"p\":{\"type\":\"openai\"}},"
                 "\"routes\":{\"r\":[{\"provider\":\"p\",\"model\":\"m\"}]}}",
                 err, sizeof(err));
    assert_non_null(c);
    k = pq_kafka_conf_new(c, PQ_KAFKA_CONSUMER, err, sizeof(err));
    assert_non_null(k);
    assert_string_equal(kget(k, "auto.commit.interval.ms", buf, sizeof(buf)), "250");
    rd_kafka_conf_destroy(k);
    pq_conf_destroy(c);

    /* a hand-made conf with a refused key is refused here too */
    memset(&hand, 0, sizeof(hand));
    kv[0].key = "acks";
    kv[0].value = "0";
    hand.kafka = kv;
    hand.nkafka = 1;
    assert_null(pq_kafka_conf_new(&hand, PQ_KAFKA_PRODUCER, err, sizeof(err)));
    assert_non_null(strstr(err, "kafka.acks: refused"));
    assert_null(pq_kafka_conf_new(&hand, PQ_KAFKA_CONSUMER, err, sizeof(err)));

    /* librdkafka's own errors name the key, never the value */
    kv[0].key = "linger.ms";
    kv[0].value = "not-a-number-SECRET";
    assert_null(pq_kafka_conf_new(&hand, PQ_KAFKA_PRODUCER, err, sizeof(err)));
    assert_non_null(strstr(err, "kafka.linger.ms: "));
    assert_null(strstr(err, SECRET_MARK));

    assert_true(pq_kafka_key_refused("acks"));
    assert_true(pq_kafka_key_refused("enable.idempotence"));
    assert_true(pq_kafka_key_refused("enable.auto.offset.store"));
    assert_true(pq_kafka_key_refused("isolation.level"));
    assert_true(pq_kafka_key_refused("enable.gapless.guarantee"));
    assert_true(pq_kafka_key_refused("max.in.flight"));
    assert_false(pq_kafka_key_refused("linger.ms"));
    assert_false(pq_kafka_key_refused("bootstrap.servers"));
    assert_false(pq_kafka_key_refused(NULL));
    assert_non_null(pq_kafka_key_refused_why("acks"));
}

static int run_cli(const char **args, int n, pq_conf_t **out)
{
    char *argv[8];

    for (int i = 0; i < n; i++)
        argv[i] = (char *)args[i];
    argv[n] = NULL;
    return pq_conf_cli(n, argv, "test-prog", out);
}

static void test_cli(void **state)
{
    char good[1200], bad[1200], arg[1300];
    pq_conf_t *c = (pq_conf_t *)1;

    (void)state;
    data_path(good, sizeof(good), "good/minimal.json");
    data_path(bad, sizeof(bad), "bad/unknown_top_key.json");

    {
        const char *a[] = {"prog", "--config", good, "--check-config"};
        assert_int_equal(run_cli(a, 4, &c), 0);
        assert_null(c);
    }
    {
        const char *a[] = {"prog", "--check-config", "--config", bad};
        assert_int_equal(run_cli(a, 4, &c), 1);
        assert_null(c);
    }
    {
        const char *a[] = {"prog", "--config", bad};
        assert_int_equal(run_cli(a, 3, &c), 1);
    }
    {
        const char *a[] = {"prog"};
        assert_int_equal(run_cli(a, 1, &c), 2); /* no config at all */
        assert_null(c);
    }
    {
        const char *a[] = {"prog", "--config"};
        assert_int_equal(run_cli(a, 2, &c), 2);
    }
    {
        const char *a[] = {"prog", "--verbose", "--config", good};
        assert_int_equal(run_cli(a, 4, &c), PQ_CONF_CLI_RUN);
        assert_non_null(c);
        assert_string_equal(c->path, good);
        pq_conf_destroy(c);
    }
    {
        snprintf(arg, sizeof(arg), "--config=%s", good);
        const char *a[] = {"prog", arg};
        assert_int_equal(run_cli(a, 2, &c), PQ_CONF_CLI_RUN);
        pq_conf_destroy(c);
    }
    {
        const char *a[] = {"prog", "--check-config"};
        setenv("PROMPTQ_CONFIG", good, 1);
        assert_int_equal(run_cli(a, 2, &c), 0);
        setenv("PROMPTQ_CONFIG", bad, 1);
        assert_int_equal(run_cli(a, 2, &c), 1);
        unsetenv("PROMPTQ_CONFIG");
    }
    {
        const char *a[] = {"prog", "--config-help"}; /* needs no config */
        assert_int_equal(run_cli(a, 2, &c), 0);
    }
    {
        char *a[] = {"prog", "--config", good, "-x", "--check-config", "--config=y", "--config"};
        assert_int_equal(pq_conf_cli_skip(7, a, 0), 0);
        assert_int_equal(pq_conf_cli_skip(7, a, 1), 2);
        assert_int_equal(pq_conf_cli_skip(7, a, 3), 0);
        assert_int_equal(pq_conf_cli_skip(7, a, 4), 1);
        assert_int_equal(pq_conf_cli_skip(7, a, 5), 1);
        assert_int_equal(pq_conf_cli_skip(7, a, 6), 1);
        assert_string_equal(pq_conf_path_from_args(7, a), good);
    }
}

/* The reference is generated from the same tables: spot-check a few rows. */
static void test_reference(void **state)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    (void)state;
    assert_non_null(f);
    pq_conf_print_reference(f);
    fclose(f);
    assert_non_null(strstr(buf, "| worker.max_inflight | integer | 4096 | 1..1000000 |"));
    assert_non_null(strstr(buf, "| log.level | enum | \"info\" | debug, info, warn, error |"));
    assert_non_null(strstr(buf, "| providers.NAME.type | enum |"));
    assert_non_null(strstr(buf, "| routes.NAME.targets.N.model | string |"));
    assert_non_null(strstr(buf, "| cache.temperature_zero | boolean | false |"));
    free(buf);
}

/* pq_conf_load keeps no global state: threads loading at once all get the same answer. */
static void *load_loop(void *arg)
{
    intptr_t bad = 0;

    (void)arg;
    for (int i = 0; i < 50; i++) {
        char path[1200], err[256];
        pq_conf_t *c;

        data_path(path, sizeof(path), "good/everything.json");
        c = pq_conf_load(path, err, sizeof(err));
        if (!c || strcmp(c->providers[0].api_keys[1], "hunter2-SECRET-value"))
            bad++;
        pq_conf_destroy(c);
        data_path(path, sizeof(path), "bad/unset_var_list.json");
        if ((c = pq_conf_load(path, err, sizeof(err))) || !strstr(err, "PQ_TEST_UNSET_VAR"))
            bad++;
        pq_conf_destroy(c);
    }
    return (void *)bad;
}

/* --check-config's warnings: a route with several targets whose silent providers outlast
 * broker.sync_timeout_ms is named; a one-target route, or timeouts that fit, are not. */
static void test_warnings(void **state)
{
    static const char *fits =
        "{\"broker\":{\"sync_timeout_ms\":50000},\"worker\":{\"max_inflight\":256},"
        "\"providers\":{\"p\":{\"type\":\"openai\",\"base_url\":\"http://127.0.0.1:1/v1\","
        "\"first_byte_timeout_ms\":20000}},"
        "\"routes\":{\"one\":[{\"provider\":\"p\",\"model\":\"m\"}],"
        "\"two\":[{\"provider\":\"p\",\"model\":\"m\"},{\"provider\":\"p\",\"model\":\"n\"}]}}";
    static const char *slow =
        "{\"broker\":{\"sync_timeout_ms\":50000},\"worker\":{\"max_inflight\":256},"
        "\"providers\":{\"p\":{\"type\":\"openai\",\"base_url\":\"http://127.0.0.1:1/v1\","
        "\"retry_on_timeout\":true}},"
        "\"routes\":{\"one\":[{\"provider\":\"p\",\"model\":\"m\"}],"
        "\"two\":[{\"provider\":\"p\",\"model\":\"m\",\"first_byte_timeout_ms\":5000},"
        "{\"provider\":\"p\",\"model\":\"n\"}]}}";
    char err[512], buf[2048];
    pq_conf_t *c;
    FILE *out;
    size_t n;

    (void)state;
    c = pq_conf_load_str(fits, strlen(fits), err, sizeof(err));
    assert_non_null(c);
    out = tmpfile();
    assert_int_equal(pq_conf_warn(c, out, "w: "), 0);
    fclose(out);
    pq_conf_destroy(c);

    c = pq_conf_load_str(slow, strlen(slow), err, sizeof(err));
    assert_non_null(c);
    out = tmpfile();
    assert_int_equal(pq_conf_warn(c, out, "w: "), 1);
    rewind(out);
    n = fread(buf, 1, sizeof(buf) - 1, out);
    buf[n] = '\0';
    fclose(out);
    /* 3 x 5 s + 3 x 60 s with retry_on_timeout and 2 retries */
    assert_non_null(strstr(buf, "w: routes.two: silent providers could take 195000 ms"));
    assert_null(strstr(buf, "routes.one"));
    pq_conf_destroy(c);
}

/* The providers' max_concurrency, each provider used by a route counted once, below
 * worker.max_inflight caps a worker's calls silently: warned, naming the figures. Unlimited
 * (0) on any used provider, a sum that reaches max_inflight, or an unused provider: no warning. */
static void test_warn_concurrency(void **state)
{
    static const struct {
        const char *json;
        int warnings;
        const char *text;
    } cases[] = {
        /* the defaults: 256 per provider, max_inflight 4096 */
        {"{\"providers\":{\"p\":{\"type\":\"openai\",\"base_url\":\"http://h/v1\"}},"
         "\"routes\":{\"r\":[{\"provider\":\"p\",\"model\":\"m\"}]}}",
         1,
         "w: worker.max_inflight (4096) is above the max_concurrency of the routes' providers "
         "summed (256: p 256)"},
        /* p used by two routes counts once; q is used by no route */
        {"{\"worker\":{\"max_inflight\":1000},\"providers\":{"
         "\"p\":{\"type\":\"openai\",\"base_url\":\"http://h/v1\",\"max_concurrency\":300},"
         "\"o\":{\"type\":\"openai\",\"base_url\":\"http://i/v1\",\"max_concurrency\":200},"
         "\"q\":{\"type\":\"openai\",\"base_url\":\"http://j/v1\",\"max_concurrency\":900}},"
         "\"routes\":{\"r\":[{\"provider\":\"p\",\"model\":\"m\"}],"
         "\"s\":[{\"provider\":\"o\",\"model\":\"m\"}],"
         "\"t\":[{\"provider\":\"p\",\"model\":\"n\"}]}}",
         1, "(500: p 300, o 200)"},
        {"{\"worker\":{\"max_inflight\":500},\"providers\":{"
         "\"p\":{\"type\":\"openai\",\"base_url\":\"http://h/v1\",\"max_concurrency\":300},"
         "\"o\":{\"type\":\"openai\",\"base_url\":\"http://i/v1\",\"max_concurrency\":200}},"
         "\"routes\":{\"r\":[{\"provider\":\"p\",\"model\":\"m\"}],"
         "\"s\":[{\"provider\":\"o\",\"model\":\"m\"}]}}",
         0, NULL},
        {"{\"worker\":{\"max_inflight\":5000},\"providers\":{"
         "\"p\":{\"type\":\"openai\",\"base_url\":\"http://h/v1\",\"max_concurrency\":0},"
         "\"o\":{\"type\":\"openai\",\"base_url\":\"http://i/v1\",\"max_concurrency\":20}},"
         "\"routes\":{\"r\":[{\"provider\":\"o\",\"model\":\"m\"}],"
         "\"s\":[{\"provider\":\"p\",\"model\":\"m\"}]}}",
         0, NULL},
    };
    char err[512], buf[2048];

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        pq_conf_t *c = pq_conf_load_str(cases[i].json, strlen(cases[i].json), err, sizeof(err));
        FILE *out = tmpfile();
        size_t n;

        assert_non_null(c);
        assert_non_null(out);
        assert_int_equal(pq_conf_warn(c, out, "w: "), cases[i].warnings);
        rewind(out);
        n = fread(buf, 1, sizeof(buf) - 1, out);
        buf[n] = '\0';
        fclose(out);
        if (cases[i].text)
            assert_non_null(strstr(buf, cases[i].text));
        else
            assert_int_equal(n, 0);
        pq_conf_destroy(c);
    }
}

static void test_reentrant(void **state)
{
    pthread_t t[4];
    void *rv;
    intptr_t bad = 0;

    (void)state;
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&t[i], NULL, load_loop, NULL), 0);
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], &rv);
        bad += (intptr_t)rv;
    }
    assert_int_equal(bad, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_example),  cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_everything),    cmocka_unit_test(test_bad_cases),
        cmocka_unit_test(test_warnings),      cmocka_unit_test(test_warn_concurrency),
        cmocka_unit_test(test_env_overrides), cmocka_unit_test(test_redis_url),
        cmocka_unit_test(test_read_errors),   cmocka_unit_test(test_kafka_conf),
        cmocka_unit_test(test_cli),           cmocka_unit_test(test_reentrant),
        cmocka_unit_test(test_reference),     cmocka_unit_test(test_watsonx_space),
        cmocka_unit_test(test_azure_v1),
    };

    return cmocka_run_group_tests(tests, setup, NULL);
}
