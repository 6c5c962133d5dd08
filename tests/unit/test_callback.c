/* callback_url checks (allow-list patterns, host matching, URL parsing through libcurl, tenant
 * secrets) and the x-promptq-signature value. The expected HMAC was computed with Python's
 * hmac + hashlib. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "promptq/callback.h"
#include "promptq/conf.h"

static const char conf_json[] =
    "{\"providers\":{\"p\":{\"type\":\"openai\",\"base_url\":\"http://127.0.0.1:9/v1\"}},"
    "\"routes\":{\"m\":[{\"provider\":\"p\",\"model\":\"x\"}]},"
    "\"callbacks\":{\"allow_hosts\":[\"hooks.example.com\",\"*.corp.example\","
    "\"127.0.0.1:8443\",\"[::1]:9000\"],"
    "\"secrets\":{\"acme\":\"s-acme\",\"*\":\"s-any\"}}}";

static pq_conf_t *load(const char *json)
{
    char err[512];
    pq_conf_t *c = pq_conf_load_str(json, strlen(json), err, sizeof(err));

    if (!c)
        fail_msg("config: %s", err);
    return c;
}

static void test_patterns(void **state)
{
    (void)state;
    assert_true(pq_callback_pattern_ok("hooks.example.com"));
    assert_true(pq_callback_pattern_ok("*.example.com"));
    assert_true(pq_callback_pattern_ok("example.com:8443"));
    assert_true(pq_callback_pattern_ok("[::1]"));
    assert_true(pq_callback_pattern_ok("[2001:db8::1]:443"));
    assert_true(pq_callback_pattern_ok("127.0.0.1"));
    assert_false(pq_callback_pattern_ok(""));
    assert_false(pq_callback_pattern_ok("*"));
    assert_false(pq_callback_pattern_ok("*."));
    assert_false(pq_callback_pattern_ok("a..b"));
    assert_false(pq_callback_pattern_ok(".example.com"));
    assert_false(pq_callback_pattern_ok("example.com."));
    assert_false(pq_callback_pattern_ok("http://example.com"));
    assert_false(pq_callback_pattern_ok("example.com/path"));
    assert_false(pq_callback_pattern_ok("example.com:0"));
    assert_false(pq_callback_pattern_ok("example.com:65536"));
    assert_false(pq_callback_pattern_ok("example.com:"));
    assert_false(pq_callback_pattern_ok("ex ample.com"));
    assert_false(pq_callback_pattern_ok("*.[::1]"));
    assert_false(pq_callback_pattern_ok("[::1"));
    assert_false(pq_callback_pattern_ok("[zz]"));
}

static void test_host_matching(void **state)
{
    char *p[] = {"hooks.example.com", "*.corp.example", "127.0.0.1:8443", "[::1]:9000"};

    (void)state;
    assert_true(pq_callback_host_allowed(p, 4, "hooks.example.com", 443));
    assert_true(pq_callback_host_allowed(p, 4, "HOOKS.Example.com", 80));
    assert_false(pq_callback_host_allowed(p, 4, "evilhooks.example.com", 443));
    assert_false(pq_callback_host_allowed(p, 4, "hooks.example.com.evil", 443));
    assert_true(pq_callback_host_allowed(p, 4, "a.corp.example", 443));
    assert_true(pq_callback_host_allowed(p, 4, "b.a.corp.example", 443));
    assert_false(pq_callback_host_allowed(p, 4, "corp.example", 443));
    assert_false(pq_callback_host_allowed(p, 4, "xcorp.example", 443));
    assert_true(pq_callback_host_allowed(p, 4, "127.0.0.1", 8443));
    assert_false(pq_callback_host_allowed(p, 4, "127.0.0.1", 8444));
    assert_true(pq_callback_host_allowed(p, 4, "[::1]", 9000));
    assert_false(pq_callback_host_allowed(p, 4, "[::1]", 9001));
    assert_false(pq_callback_host_allowed(p, 4, "a%2ecorp.example", 443));
    assert_false(pq_callback_host_allowed(p, 4, "", 443));
    assert_false(pq_callback_host_allowed(p, 0, "hooks.example.com", 443));
}

static void test_check(void **state)
{
    pq_conf_t *c = load(conf_json);
    char why[300];

    (void)state;
    assert_int_equal(
        pq_callback_check(c, "acme", "https://hooks.example.com/h?token=t", why, sizeof(why)), 0);
    assert_int_equal(pq_callback_check(c, "x", "http://a.corp.example/h", why, sizeof(why)), 0);
    assert_int_equal(pq_callback_check(c, "x", "http://127.0.0.1:8443/", why, sizeof(why)), 0);
    assert_int_equal(pq_callback_check(c, "x", "http://[::1]:9000/cb", why, sizeof(why)), 0);

    assert_int_equal(pq_callback_check(c, "x", "http://127.0.0.1/", why, sizeof(why)), -1);
    assert_non_null(strstr(why, "127.0.0.1:80 is not on callbacks.allow_hosts"));
    assert_int_equal(
        pq_callback_check(c, "x", "https://hooks.example.com:8443/x?secret=s", why, sizeof(why)),
        0);
    assert_int_equal(pq_callback_check(c, "x", "https://evil.com/x?token=SECRET", why, sizeof(why)),
                     -1);
    assert_null(strstr(why, "SECRET")); /* never the path or query */
    assert_int_equal(pq_callback_check(c, "x", "https://u:p@hooks.example.com/", why, sizeof(why)),
                     -1);
    assert_non_null(strstr(why, "credentials"));
    assert_null(strstr(why, "u:p"));
    /* libcurl's parser decides the host: the allow-listed name after "@" is not the host */
    assert_int_equal(
        pq_callback_check(c, "x", "https://hooks.example.com@evil.com/", why, sizeof(why)), -1);
    assert_int_equal(pq_callback_check(c, "x", "ftp://hooks.example.com/", why, sizeof(why)), -1);
    assert_int_equal(pq_callback_check(c, "x", "not a url", why, sizeof(why)), -1);
    pq_conf_destroy(c);

    /* no secret for the tenant, no "*" */
    c = load("{\"providers\":{\"p\":{\"type\":\"openai\",\"base_url\":\"http://127.0.0.1:9/v1\"}},"
             "\"routes\":{\"m\":[{\"provider\":\"p\",\"model\":\"x\"}]},"
             "\"callbacks\":{\"allow_hosts\":[\"h.example\"],\"secrets\":{\"acme\":\"s\"}}}");
    assert_int_equal(pq_callback_check(c, "acme", "https://h.example/", why, sizeof(why)), 0);
    assert_int_equal(pq_callback_check(c, "other", "https://h.example/", why, sizeof(why)), -1);
    assert_non_null(strstr(why, "no callback secret"));
    assert_string_equal(pq_callback_secret(c, "acme"), "s");
    assert_null(pq_callback_secret(c, "other"));
    pq_conf_destroy(c);

    /* no allow-list: no callbacks at all */
    c = load("{\"providers\":{\"p\":{\"type\":\"openai\",\"base_url\":\"http://127.0.0.1:9/v1\"}},"
             "\"routes\":{\"m\":[{\"provider\":\"p\",\"model\":\"x\"}]}}");
    assert_int_equal(pq_callback_check(c, "acme", "https://h.example/", why, sizeof(why)), -1);
    assert_non_null(strstr(why, "not enabled"));
    pq_conf_destroy(c);
}

static void test_conf_errors(void **state)
{
    char err[512];
    const char *bad[][2] = {
        {"\"allow_hosts\":[\"http://x\"]", "callbacks.allow_hosts: entry 1"},
        {"\"secrets\":{\"t\":\"\"}", "callbacks.secrets.t: must not be empty"},
        {"\"backoff_ms\":5000,\"max_backoff_ms\":1000", "callbacks.backoff_ms"},
        {"\"retries\":3", "callbacks.retries: unknown key"},
    };

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char json[1024];
        pq_conf_t *c;

        snprintf(json, sizeof(json),
                 "{\"providers\":{\"p\":{\"type\":\"openai\",\"base_url\":\"http://h/v1\"}},"
                 "\"routes\":{\"m\":[{\"provider\":\"p\",\"model\":\"x\"}]},"
                 "\"callbacks\":{%s}}",
                 bad[i][0]);
        c = pq_conf_load_str(json, strlen(json), err, sizeof(err));
        assert_null(c);
        if (!strstr(err, bad[i][1]))
            fail_msg("case %zu: got \"%s\", want \"%s\"", i, err, bad[i][1]);
    }
}

static void test_signature(void **state)
{
    char sig[PQ_CALLBACK_SIG_SIZE];
    const char body[] = "{\"id\":\"j1\"}";

    (void)state;
    assert_int_equal(pq_callback_sign("whsec", 1700000000, body, strlen(body), sig, sizeof(sig)),
                     0);
    assert_string_equal(sig, "t=1700000000,v1=d218568bf21390bf7e850a94a19b7d1a65e0076e9804be1a6173"
                             "432467acdfed");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_patterns),  cmocka_unit_test(test_host_matching),
        cmocka_unit_test(test_check),     cmocka_unit_test(test_conf_errors),
        cmocka_unit_test(test_signature),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
