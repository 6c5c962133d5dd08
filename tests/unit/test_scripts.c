/* The script registry (SHA1 per script) and the bounded EVALSHA/EVAL builders of
 * promptq/scripts.h: KEYS/ARGV layouts as the scripts document them, and no builder writes past
 * its arrays. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>
#include <openssl/evp.h>

#include "promptq/scripts.h"

/* SHA1 hex computed here with OpenSSL's one-shot digest, as Redis does for SCRIPT LOAD. */
static void sha1_hex(const char *s, char out[41])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;

    EVP_Digest(s, strlen(s), md, &n, EVP_sha1(), NULL);
    for (unsigned int i = 0; i < 20; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static void test_registry(void **state)
{
    char want[41];

    (void)state;
    for (int i = 0; i < PQ_SCRIPT__CNT; i++) {
        const char *text = pq_script_text((pq_script_id_t)i);
        const char *sha = pq_script_sha1((pq_script_id_t)i);

        assert_non_null(text);
        assert_non_null(sha);
        assert_int_equal(strlen(sha), 40);
        sha1_hex(text, want);
        assert_string_equal(sha, want);
        for (int j = 0; j < i; j++)
            assert_string_not_equal(sha, pq_script_sha1((pq_script_id_t)j));
    }
    assert_ptr_equal(pq_script_text(PQ_SCRIPT_JOB_FINISH), pq_script_job_finish);
    assert_null(pq_script_text(PQ_SCRIPT__CNT));
    assert_null(pq_script_sha1((pq_script_id_t)-1));
}

static void test_noscript(void **state)
{
    (void)state;
    assert_true(pq_script_noscript("NOSCRIPT No matching script. Please use EVAL.", 45));
    assert_false(pq_script_noscript("ERR unknown command", 19));
    assert_false(pq_script_noscript("NOSCR", 5));
    assert_false(pq_script_noscript(NULL, 0));
}

static void test_finish_layout(void **state)
{
    pq_script_cmd_t c;
    pq_job_finish_args_t a = {0};
    static const char result[] = "{\"id\":\"a\"}\0tail"; /* lengths are kept, not strlen */

    (void)state;
    a.job_key = "promptq:job:t:a";
    a.lease_key = "promptq:lease:t:a";
    a.callbacks_key = "promptq:callbacks";
    a.status = "succeeded";
    a.result = result;
    a.result_len = sizeof(result) - 1;
    a.provider = "sim";
    a.model = "m";
    a.route = "r";
    a.request_hash = "h";
    a.tenant = "t";
    a.callback_url = "http://x/";
    a.callback_refused = "ignored when a url is queued";
    a.attempts = 3;
    a.now_ms = 1700000000123;
    a.ttl_ms = 604800000;
    assert_int_equal(pq_script_job_finish_cmd(&c, 0, &a), 0);
    /* EVALSHA sha 3 + 3 KEYS + 14 ARGV */
    assert_int_equal(c.argc, 20);
    assert_string_equal(c.argv[0], "EVALSHA");
    assert_string_equal(c.argv[1], pq_script_sha1(PQ_SCRIPT_JOB_FINISH));
    assert_string_equal(c.argv[2], "3");
    assert_string_equal(c.argv[3], a.job_key);
    assert_string_equal(c.argv[5], a.callbacks_key);
    assert_string_equal(c.argv[6], "succeeded");
    assert_int_equal(c.lens[7], sizeof(result) - 1);
    assert_int_equal(c.lens[8], 0); /* no response given: "" */
    assert_string_equal(c.argv[12], "3");
    assert_string_equal(c.argv[13], "1700000000123");
    assert_string_equal(c.argv[14], "604800000");
    assert_string_equal(c.argv[17], "http://x/");
    assert_string_equal(c.argv[18], "t");
    assert_string_equal(c.argv[19], "");
    for (int i = 0; i < c.argc; i++)
        if (i != 7)
            assert_int_equal(c.lens[i], strlen(c.argv[i]));

    a.callback_url = NULL;
    a.callback_refused = "not allowed";
    assert_int_equal(pq_script_job_finish_cmd(&c, 1, &a), 0);
    assert_string_equal(c.argv[0], "EVAL");
    assert_ptr_equal(c.argv[1], pq_script_job_finish);
    assert_string_equal(c.argv[17], "");
    assert_string_equal(c.argv[19], "not allowed");
}

static void test_begin_layout(void **state)
{
    pq_script_cmd_t c;
    pq_job_begin_args_t a = {0};

    (void)state;
    a.job_key = "j";
    a.lease_key = "l";
    a.index_key = "promptq:jobs:t";
    a.request_hash = "h";
    a.route = "r";
    a.owner = "o";
    a.delivery = "o/t/0/1";
    a.id = "a";
    a.now_ms = 5;
    a.ttl_ms = 6;
    a.lease_ms = 7;
    a.max_deliveries = 8;
    assert_int_equal(pq_script_job_begin_cmd(&c, 0, &a), 0);
    a.from_source = 1;
    assert_int_equal(pq_script_job_begin_cmd(&c, 0, &a), 0);
    assert_int_equal(c.argc, 3 + 3 + 10);
    assert_string_equal(c.argv[2], "3");
    assert_string_equal(c.argv[5], "promptq:jobs:t");
    assert_string_equal(c.argv[6], "h");
    assert_string_equal(c.argv[10], "o");
    assert_string_equal(c.argv[11], "7");
    assert_string_equal(c.argv[13], "o/t/0/1");
    assert_string_equal(c.argv[14], "a");
    assert_string_equal(c.argv[15], "1");
    a.index_key = NULL; /* not indexed: no KEYS[3], ARGV[9] "" */
    a.from_source = 0;
    assert_int_equal(pq_script_job_begin_cmd(&c, 0, &a), 0);
    assert_int_equal(c.argc, 3 + 2 + 10);
    assert_string_equal(c.argv[2], "2");
    assert_string_equal(c.argv[12], "o/t/0/1");
    assert_string_equal(c.argv[13], "");
    assert_string_equal(c.argv[14], "0");
}

static void test_small_layouts(void **state)
{
    pq_script_cmd_t c;

    (void)state;
    assert_int_equal(pq_script_lease_renew_cmd(&c, 0, "l", "o", 30000), 0);
    assert_int_equal(c.argc, 6);
    assert_string_equal(c.argv[5], "30000");
    assert_int_equal(pq_script_job_park_cmd(&c, 0, "j", "l", 1, "o", 2, 3), 0);
    assert_int_equal(c.argc, 3 + 2 + 4);
    assert_int_equal(pq_script_job_release_cmd(&c, 1, "l", "j", "o", 4), 0);
    assert_int_equal(c.argc, 3 + 2 + 2);
    assert_string_equal(c.argv[0], "EVAL");
    assert_int_equal(pq_script_callback_claim_cmd(&c, 0, "z", 1, 2, 64), 0);
    assert_int_equal(c.argc, 3 + 1 + 3);
    assert_int_equal(pq_script_callback_done_cmd(&c, 0, "z", "j", "retry", 2, 3, 4, "HTTP 500"), 0);
    assert_int_equal(c.argc, 3 + 2 + 5);
    assert_string_equal(c.argv[9], "HTTP 500");
}

static void test_bounds(void **state)
{
    pq_script_cmd_t c;
    int rc = 0;

    (void)state;
    assert_int_equal(pq_script_cmd_init(&c, PQ_SCRIPT_JOB_BEGIN, 0, 2), 0);
    for (int i = 0; i < 2 * PQ_SCRIPT_ARGV_MAX; i++)
        rc |= pq_script_cmd_str(&c, "x");
    assert_int_equal(rc, -1);
    assert_int_equal(c.argc, PQ_SCRIPT_ARGV_MAX);
    assert_true(c.overflow);

    assert_int_equal(pq_script_cmd_init(&c, PQ_SCRIPT_JOB_BEGIN, 0, 0), 0);
    rc = 0;
    for (int i = 0; i < PQ_SCRIPT_NUM_MAX + 3; i++)
        rc |= pq_script_cmd_int(&c, INT64_MIN);
    assert_int_equal(rc, -1);
    assert_int_equal(c.nnum, PQ_SCRIPT_NUM_MAX);
    assert_string_equal(c.argv[3], "-9223372036854775808");

    assert_int_equal(pq_script_cmd_init(&c, PQ_SCRIPT__CNT, 0, 0), -1);
    assert_int_equal(pq_script_cmd_init(&c, PQ_SCRIPT_JOB_BEGIN, 0, PQ_SCRIPT_ARGV_MAX + 1), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_registry),      cmocka_unit_test(test_noscript),
        cmocka_unit_test(test_finish_layout), cmocka_unit_test(test_begin_layout),
        cmocka_unit_test(test_small_layouts), cmocka_unit_test(test_bounds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
