/* Envelope parsing, data-driven: each folder under $PQ_TEST_DATA/envelope/ holds input.json (raw
 * bytes, not necessarily JSON), optional limits.json ({"max_bytes","max_prompt_bytes",
 * "max_messages"}) and expected.json, either {"error": "substring", "code": "invalid" |
 * "too_large", optional "error_lacks": a string or list the error must not contain} or the fields
 * of a successful parse (each optional): "envelope" (the normalised document, compared after a dump
 * round trip), "id", "tenant", "model", "deadline_ms", "cache", "callback_url", "reply_to",
 * "has_metadata", "has_park", "request_hash". Also: dump, set_id, set_reply_to and job id
 * generation. */
#include <dirent.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <sys/stat.h>

#include "promptq/envelope.h"
#include "promptq/util.h"

static const char *data_dir(void)
{
    const char *d = getenv("PQ_TEST_DATA");
    return d ? d : "tests/data";
}

static char *read_case_file(const char *name, const char *file, size_t *len)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/envelope/%s/%s", data_dir(), name, file);
    return pq_file_read(path, 16 * 1024 * 1024, len);
}

static json_t *load_case_json(const char *name, const char *file)
{
    char path[1024];
    json_error_t err;
    snprintf(path, sizeof(path), "%s/envelope/%s/%s", data_dir(), name, file);
    return json_load_file(path, 0, &err);
}

static void want_string(json_t *exp, const char *key, const char *actual)
{
    json_t *v = json_object_get(exp, key);
    if (!v)
        return;
    if (json_is_null(v)) {
        if (actual)
            fail_msg("%s: expected null, got \"%s\"", key, actual);
        return;
    }
    if (!actual)
        fail_msg("%s: expected \"%s\", got NULL", key, json_string_value(v));
    assert_string_equal(actual, json_string_value(v));
}

static void want_int(json_t *exp, const char *key, long long actual)
{
    json_t *v = json_object_get(exp, key);
    if (v)
        assert_int_equal(actual, json_integer_value(v));
}

static void want_bool(json_t *exp, const char *key, int actual)
{
    json_t *v = json_object_get(exp, key);
    if (v)
        assert_int_equal(!!actual, json_is_true(v));
}

/* "error_lacks": a string or a list of strings the error must not contain (input bytes). */
static void want_lacks(const char *name, json_t *lacks, const char *errstr)
{
    size_t i, n = json_is_array(lacks) ? json_array_size(lacks) : (lacks ? 1 : 0);

    for (i = 0; i < n; i++) {
        const char *s = json_string_value(json_is_array(lacks) ? json_array_get(lacks, i) : lacks);
        if (s && strstr(errstr, s))
            fail_msg("case %s: error \"%s\" contains \"%s\"", name, errstr, s);
    }
}

static void test_case(void **state)
{
    const char *name = *state;
    pq_envelope_limits_t lim = pq_envelope_limits_default;
    pq_envelope_t env;
    char errstr[512];
    size_t len = 0;
    char *input = read_case_file(name, "input.json", &len);
    json_t *exp = load_case_json(name, "expected.json");
    json_t *limits = load_case_json(name, "limits.json");
    pq_err_t rc;

    if (!input || !exp)
        fail_msg("case %s: cannot read input.json or expected.json", name);
    if (limits) {
        json_t *v;
        if ((v = json_object_get(limits, "max_bytes")))
            lim.max_bytes = (size_t)json_integer_value(v);
        if ((v = json_object_get(limits, "max_prompt_bytes")))
            lim.max_prompt_bytes = (size_t)json_integer_value(v);
        if ((v = json_object_get(limits, "max_messages")))
            lim.max_messages = (size_t)json_integer_value(v);
    }

    rc = pq_envelope_parse(input, len, &lim, &env, errstr, sizeof(errstr));
    if (json_object_get(exp, "error")) {
        const char *sub = json_string_value(json_object_get(exp, "error"));
        const char *code = json_string_value(json_object_get(exp, "code"));
        if (rc == PQ_OK)
            fail_msg("case %s: parsed, expected error \"%s\"", name, sub);
        if (!strstr(errstr, sub))
            fail_msg("case %s: error \"%s\" lacks \"%s\"", name, errstr, sub);
        want_lacks(name, json_object_get(exp, "error_lacks"), errstr);
        assert_int_equal(rc, code && strcmp(code, "too_large") == 0 ? PQ_ERR_TOO_LARGE
                                                                    : PQ_ERR_INVALID);
        /* out is left cleared */
        assert_null(env.root);
        assert_null(env.request);
        assert_int_equal(env.cache, -1);
    } else {
        json_t *want = json_object_get(exp, "envelope");
        if (rc != PQ_OK)
            fail_msg("case %s: expected success, got %s: %s", name, pq_err_name(rc), errstr);
        assert_non_null(env.root);
        assert_non_null(env.request);
        assert_non_null(env.model);
        assert_non_null(env.tenant);
        assert_int_equal(strlen(env.request_hash), PQ_SHA256_HEX_LEN);
        if (want) {
            size_t dlen = 0;
            char *dump = pq_envelope_dump(&env, &dlen);
            json_error_t jerr;
            json_t *back;
            assert_non_null(dump);
            assert_int_equal(dlen, strlen(dump));
            assert_null(strchr(dump, '\n'));
            back = json_loads(dump, 0, &jerr);
            assert_non_null(back);
            if (!json_equal(back, want))
                fail_msg("case %s: normalised envelope differs: %s", name, dump);
            json_decref(back);
            free(dump);
        }
        want_string(exp, "id", env.id);
        want_string(exp, "tenant", env.tenant);
        want_string(exp, "model", env.model);
        want_string(exp, "callback_url", env.callback_url);
        want_string(exp, "reply_to", env.reply_to);
        want_string(exp, "request_hash", env.request_hash);
        want_int(exp, "deadline_ms", env.deadline_ms);
        want_int(exp, "cache", env.cache);
        want_bool(exp, "has_metadata", env.metadata != NULL);
        want_bool(exp, "has_park", env.park != NULL);
        pq_envelope_clear(&env);
        assert_null(env.root);
    }
    json_decref(limits);
    json_decref(exp);
    free(input);
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* ---- non data-driven tests ----------------------------------------------------------------- */

static const char *SIMPLE =
    "{\"tenant\":\"t1\",\"request\":{\"model\":\"m\",\"messages\":[{\"role\":\"user\","
    "\"content\":\"line one\\nline two\\r\\n\\u2028end\"}]},\"metadata\":{\"k\":\"a\\nb\"}}";

/* The dump is jansson's compact text, byte for byte, around its 4 KiB stack buffer: smaller,
 * exactly that size, one byte more, and much larger. */
static void set_content(pq_envelope_t *env, size_t n)
{
    json_t *msg =
        json_array_get(json_object_get(json_object_get(env->root, "request"), "messages"), 0);
    char *content = malloc(n + 1);

    assert_non_null(content);
    memset(content, 'x', n);
    content[n] = '\0';
    assert_int_equal(json_object_set_new(msg, "content", json_string(content)), 0);
    free(content);
}

static void test_dump_sizes(void **state)
{
    static const size_t sizes[] = {200, 4095, 4096, 4097, 100000};

    (void)state;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        pq_envelope_t env;
        char errstr[256], *want, *dump;
        size_t len = 0, base;

        assert_int_equal(
            pq_envelope_parse(SIMPLE, strlen(SIMPLE), NULL, &env, errstr, sizeof(errstr)), PQ_OK);
        set_content(&env, 0);
        want = json_dumps(env.root, JSON_COMPACT);
        assert_non_null(want);
        base = strlen(want);
        free(want);
        assert_true(base < sizes[i]);
        set_content(&env, sizes[i] - base);
        want = json_dumps(env.root, JSON_COMPACT);
        dump = pq_envelope_dump(&env, &len);
        assert_non_null(want);
        assert_non_null(dump);
        assert_int_equal(len, sizes[i]);
        assert_int_equal(strlen(dump), sizes[i]);
        assert_string_equal(dump, want);
        free(want);
        free(dump);
        pq_envelope_clear(&env);
    }
}

static void test_dump_one_line(void **state)
{
    pq_envelope_t env, again;
    char errstr[256];
    size_t len;
    char *dump;

    assert_int_equal(pq_envelope_parse(SIMPLE, strlen(SIMPLE), NULL, &env, errstr, sizeof(errstr)),
                     PQ_OK);
    dump = pq_envelope_dump(&env, &len);
    assert_non_null(dump);
    assert_int_equal(len, strlen(dump));
    assert_null(memchr(dump, '\n', len));
    assert_null(memchr(dump, '\r', len));
    /* round trip: same request hash, same fields */
    assert_int_equal(pq_envelope_parse(dump, len, NULL, &again, errstr, sizeof(errstr)), PQ_OK);
    assert_string_equal(again.request_hash, env.request_hash);
    assert_string_equal(again.tenant, "t1");
    assert_true(json_equal(again.root, env.root));
    free(dump);
    pq_envelope_clear(&again);
    pq_envelope_clear(&env);
    pq_envelope_clear(&env); /* twice is fine */
}

static void test_set_id_reply_to(void **state)
{
    pq_envelope_t env;
    char errstr[256], hash[PQ_SHA256_HEX_LEN + 1];
    const char *bare = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
    char *dump;

    assert_int_equal(pq_envelope_parse(bare, strlen(bare), NULL, &env, errstr, sizeof(errstr)),
                     PQ_OK);
    assert_null(env.id);
    memcpy(hash, env.request_hash, sizeof(hash));
    assert_int_equal(pq_envelope_set_id(&env, "job_01ABC"), 0);
    assert_string_equal(env.id, "job_01ABC");
    assert_int_equal(pq_envelope_set_id(&env, "job_02DEF"), 0); /* replace */
    assert_string_equal(env.id, "job_02DEF");
    assert_int_equal(pq_envelope_set_id(&env, "bad id"), -1);
    assert_int_equal(pq_envelope_set_id(&env, ""), -1);
    assert_int_equal(pq_envelope_set_id(&env, NULL), -1);
    assert_string_equal(env.id, "job_02DEF");
    assert_int_equal(pq_envelope_set_reply_to(&env, "broker-7"), 0);
    assert_string_equal(env.reply_to, "broker-7");
    assert_int_equal(pq_envelope_set_reply_to(&env, ""), -1);
    /* borrowed pointers still valid after the changes */
    assert_string_equal(env.model, "m");
    assert_string_equal(env.tenant, "default");
    assert_string_equal(env.request_hash, hash);
    assert_int_equal(pq_envelope_set_tenant(&env, "acme"), 0);
    assert_string_equal(env.tenant, "acme");
    assert_int_equal(pq_envelope_set_tenant(&env, "a/b"), -1);
    assert_string_equal(env.tenant, "acme");
    /* park / error objects: set, replace, remove; other keys and non-objects refused */
    assert_null(env.park);
    assert_int_equal(pq_envelope_set_object(&env, "park", json_pack("{si}", "attempts", 3)), 0);
    assert_non_null(env.park);
    assert_int_equal(json_integer_value(json_object_get(env.park, "attempts")), 3);
    assert_int_equal(pq_envelope_set_object(&env, "error", json_pack("{ss}", "type", "x")), 0);
    assert_int_equal(pq_envelope_set_object(&env, "error", NULL), 0);
    assert_null(json_object_get(env.root, "error"));
    assert_int_equal(pq_envelope_set_object(&env, "request", json_object()), -1);
    assert_int_equal(pq_envelope_set_object(&env, "park", json_string("x")), -1);
    assert_non_null(env.park);
    assert_int_equal(pq_envelope_set_object(&env, "park", NULL), 0);
    assert_null(env.park);
    dump = pq_envelope_dump(&env, NULL);
    assert_non_null(dump);
    assert_non_null(strstr(dump, "\"tenant\":\"acme\""));
    assert_non_null(strstr(dump, "\"id\":\"job_02DEF\""));
    assert_non_null(strstr(dump, "\"reply_to\":\"broker-7\""));
    assert_non_null(strstr(dump, "\"request\":{\"model\":\"m\""));
    free(dump);
    pq_envelope_clear(&env);
    assert_int_equal(pq_envelope_set_id(&env, "x"), -1); /* cleared envelope */
    assert_null(pq_envelope_dump(&env, NULL));
}

/* reply_to is limited to promptq's own reply channels when the limits name their prefix (the
 * worker's), so a direct producer cannot make a worker PUBLISH to any channel. */
static void test_reply_prefix(void **state)
{
    static const char ok[] = "{\"id\":\"a\",\"request\":{\"model\":\"m\",\"messages\":[{\"role\":"
                             "\"user\",\"content\":\"hi\"}]},"
                             "\"reply_to\":\"promptq:reply:b-1\"}";
    static const char bad[] = "{\"id\":\"a\",\"request\":{\"model\":\"m\",\"messages\":[{\"role\":"
                              "\"user\",\"content\":\"hi\"}]},"
                              "\"reply_to\":\"__keyspace@0__:secret-channel\"}";
    pq_envelope_limits_t lim = pq_envelope_limits_default;
    pq_envelope_t env;
    char err[256];

    (void)state;
    /* without a prefix (the default) any channel name passes, as before */
    assert_int_equal(pq_envelope_parse(bad, strlen(bad), &lim, &env, err, sizeof(err)), PQ_OK);
    pq_envelope_clear(&env);
    lim.reply_prefix = "promptq:reply:";
    assert_int_equal(pq_envelope_parse(ok, strlen(ok), &lim, &env, err, sizeof(err)), PQ_OK);
    assert_string_equal(env.reply_to, "promptq:reply:b-1");
    pq_envelope_clear(&env);
    assert_int_equal(pq_envelope_parse(bad, strlen(bad), &lim, &env, err, sizeof(err)),
                     PQ_ERR_INVALID);
    assert_non_null(strstr(err, "reply_to: must be a promptq reply channel (promptq:reply:"));
    assert_null(strstr(err, "secret-channel")); /* input never echoed */
}

static void test_default_document_cap(void **state)
{
    size_t n = pq_envelope_limits_default.max_bytes + 1;
    char *buf = malloc(n);
    pq_envelope_t env;
    char errstr[256];

    assert_non_null(buf);
    memset(buf, ' ', n);
    assert_int_equal(pq_envelope_parse(buf, n, NULL, &env, errstr, sizeof(errstr)),
                     PQ_ERR_TOO_LARGE);
    assert_non_null(strstr(errstr, "max_bytes"));
    assert_int_equal(pq_envelope_parse(NULL, 0, NULL, &env, errstr, sizeof(errstr)),
                     PQ_ERR_INVALID);
    free(buf);
}

static void test_id_tenant_valid(void **state)
{
    char id[PQ_ID_MAX + 2];

    assert_true(pq_id_valid("a"));
    assert_true(pq_id_valid("Az09._:-"));
    assert_false(pq_id_valid(""));
    assert_false(pq_id_valid(NULL));
    assert_false(pq_id_valid("a/b"));
    assert_false(pq_id_valid("a b"));
    assert_false(pq_id_valid("\xc3\xa9"));
    memset(id, 'x', PQ_ID_MAX);
    id[PQ_ID_MAX] = '\0';
    assert_true(pq_id_valid(id));
    id[PQ_ID_MAX] = 'x';
    id[PQ_ID_MAX + 1] = '\0';
    assert_false(pq_id_valid(id));
    assert_false(pq_id_valid("."));
    assert_false(pq_id_valid(".."));
    assert_true(pq_id_valid("..."));
    assert_true(pq_tenant_valid("acme-corp.eu_1"));
    assert_false(pq_tenant_valid("a:b"));
    assert_false(pq_tenant_valid(""));
}

#define GEN_N 10000

static int is_crockford(char c)
{
    return c && strchr("0123456789ABCDEFGHJKMNPQRSTVWXYZ", c) != NULL;
}

static void test_id_generate(void **state)
{
    static char ids[GEN_N][PQ_JOB_ID_LEN + 1];
    int64_t before = pq_now_ms(), after;

    for (int i = 0; i < GEN_N; i++)
        pq_id_generate(ids[i]);
    after = pq_now_ms();
    for (int i = 0; i < GEN_N; i++) {
        assert_int_equal(strlen(ids[i]), PQ_JOB_ID_LEN);
        assert_memory_equal(ids[i], "job_", 4);
        for (int j = 4; j < PQ_JOB_ID_LEN; j++)
            if (!is_crockford(ids[i][j]))
                fail_msg("id %s: bad character at %d", ids[i], j);
        assert_true(ids[i][4] <= '7'); /* 128 bits in 130: the first digit is at most 7 */
        assert_true(pq_id_valid(ids[i]));
        if (i > 0 && strcmp(ids[i - 1], ids[i]) >= 0)
            fail_msg("ids not strictly increasing: %s then %s", ids[i - 1], ids[i]);
    }
    /* the first 10 digits are the millisecond timestamp */
    {
        int64_t ts = 0;
        const char *alpha = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        for (int j = 4; j < 14; j++)
            ts = ts * 32 + (strchr(alpha, ids[0][j]) - alpha);
        assert_true(ts >= before && ts <= after + 1);
    }
}

#define GEN_THREADS 4
#define GEN_PER     5000

static void *gen_thread(void *arg)
{
    char(*out)[PQ_JOB_ID_LEN + 1] = arg;
    for (int i = 0; i < GEN_PER; i++)
        pq_id_generate(out[i]);
    return NULL;
}

static int id_cmp(const void *a, const void *b)
{
    return strcmp(a, b);
}

static void test_id_generate_threads(void **state)
{
    static char ids[GEN_THREADS * GEN_PER][PQ_JOB_ID_LEN + 1];
    pthread_t t[GEN_THREADS];

    for (int i = 0; i < GEN_THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, gen_thread, ids[i * GEN_PER]), 0);
    for (int i = 0; i < GEN_THREADS; i++)
        pthread_join(t[i], NULL);
    /* each thread's ids increase, and all are distinct */
    for (int i = 0; i < GEN_THREADS; i++)
        for (int j = 1; j < GEN_PER; j++)
            assert_true(strcmp(ids[i * GEN_PER + j - 1], ids[i * GEN_PER + j]) < 0);
    qsort(ids, GEN_THREADS * GEN_PER, sizeof(ids[0]), id_cmp);
    for (int i = 1; i < GEN_THREADS * GEN_PER; i++)
        if (strcmp(ids[i - 1], ids[i]) == 0)
            fail_msg("duplicate id %s", ids[i]);
}

int main(void)
{
    static const struct CMUnitTest fixed[] = {
        cmocka_unit_test(test_dump_one_line),        cmocka_unit_test(test_set_id_reply_to),
        cmocka_unit_test(test_default_document_cap), cmocka_unit_test(test_reply_prefix),
        cmocka_unit_test(test_id_tenant_valid),      cmocka_unit_test(test_id_generate),
        cmocka_unit_test(test_id_generate_threads),  cmocka_unit_test(test_dump_sizes),
    };
    char path[1024], **names = NULL;
    size_t n = 0, cap = 0, nfixed = sizeof(fixed) / sizeof(fixed[0]);
    struct CMUnitTest *tests;
    struct dirent *de;
    DIR *dir;
    int rc;

    snprintf(path, sizeof(path), "%s/envelope", data_dir());
    dir = opendir(path);
    if (!dir) {
        fprintf(stderr, "cannot open %s (set PQ_TEST_DATA)\n", path);
        return 1;
    }
    while ((de = readdir(dir))) {
        char sub[1300];
        struct stat st;
        if (de->d_name[0] == '.')
            continue;
        snprintf(sub, sizeof(sub), "%s/%s", path, de->d_name);
        if (stat(sub, &st) != 0 || !S_ISDIR(st.st_mode))
            continue; /* README.md and the like */
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            names = realloc(names, cap * sizeof(*names));
            assert_non_null(names);
        }
        names[n++] = strdup(de->d_name);
    }
    closedir(dir);
    if (n == 0) {
        fprintf(stderr, "no cases in %s\n", path);
        return 1;
    }
    qsort(names, n, sizeof(*names), name_cmp);
    tests = calloc(n + nfixed, sizeof(*tests));
    for (size_t i = 0; i < n; i++) {
        tests[i].name = names[i];
        tests[i].test_func = test_case;
        tests[i].initial_state = names[i];
    }
    memcpy(tests + n, fixed, sizeof(fixed));
    rc = _cmocka_run_group_tests("envelope", tests, n + nfixed, NULL, NULL);
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    free(tests);
    return rc;
}
