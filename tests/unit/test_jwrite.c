/* The JSON writer (common/src/jwrite.c): what it writes reads back in jansson and in the strict
 * scanner, strings escaped and made valid, jansson values dumped in place. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <jansson.h>

#include "promptq/jscan.h"
#include "promptq/jwrite.h"

/* s (len) as jansson and the scanner read it; the document, or a failed test. */
static json_t *reads_back(const char *s, size_t len)
{
    json_t *o = json_loadb(s, len, JSON_ALLOW_NUL, NULL);
    pq_js_t v;

    assert_non_null(s);
    assert_int_equal(strlen(s), len);
    assert_non_null(o);
    assert_int_equal(pq_js_check(s, len, 16, &v, NULL), 0);
    return o;
}

static void test_members(void **state)
{
    json_t *meta = json_pack("{s:s, s:[i, f]}", "k", "v\"\n", "a", 1, 2.5), *o;
    pq_jw_t w;
    size_t len;
    char *s;
    (void)state;

    pq_jw_init(&w, 4); /* tiny: every write grows it */
    pq_jw_raw(&w, "{", 1);
    pq_jw_key(&w, "s");
    pq_jw_str(&w, "quote \" backslash \\ tab \t nl \n bell \a del \x7f é €");
    pq_jw_key(&w, "none");
    pq_jw_str(&w, NULL);
    pq_jw_key(&w, "n");
    pq_jw_int(&w, INT64_MIN);
    pq_jw_key(&w, "m");
    pq_jw_json(&w, meta);
    pq_jw_key(&w, "null");
    pq_jw_json(&w, NULL);
    pq_jw_key(&w, "raw");
    pq_jw_raw(&w, "[1, {\"x\": true}]", 16);
    pq_jw_key(&w, "nested");
    pq_jw_raw(&w, "{", 1);
    pq_jw_key(&w, "first");
    pq_jw_int(&w, 7);
    pq_jw_raw(&w, "}}", 2);
    s = pq_jw_finish(&w, &len);
    o = reads_back(s, len);
    assert_string_equal(json_string_value(json_object_get(o, "s")),
                        "quote \" backslash \\ tab \t nl \n bell \a del \x7f é €");
    assert_true(json_is_null(json_object_get(o, "none")));
    assert_true(json_integer_value(json_object_get(o, "n")) == INT64_MIN);
    assert_true(json_equal(json_object_get(o, "m"), meta));
    assert_true(json_is_null(json_object_get(o, "null")));
    assert_int_equal(json_array_size(json_object_get(o, "raw")), 2);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(o, "nested"), "first")), 7);
    assert_null(strstr(s, ",,"));
    assert_null(strstr(s, "{,"));
    assert_int_equal(w.len, 0);
    json_decref(o);
    json_decref(meta);
    free(s);
}

static void test_invalid_utf8(void **state)
{
    /* a cut sequence, an overlong, a surrogate, a stray continuation byte, then valid text */
    const char bad[] = "a\xc3\x28\xc0\xaf\xed\xa0\x80\x80z\xf0\x9f\x98\x80";
    pq_jw_t w;
    size_t len;
    char *s;
    json_t *o;
    (void)state;

    pq_jw_init(&w, 0);
    pq_jw_raw(&w, "[", 1);
    pq_jw_strn(&w, bad, sizeof(bad) - 1);
    pq_jw_raw(&w, ",", 1);
    pq_jw_strn(&w, "a\0b", 3); /* NUL is escaped */
    pq_jw_raw(&w, "]", 1);
    s = pq_jw_finish(&w, &len);
    o = reads_back(s, len);
    assert_string_equal(json_string_value(json_array_get(o, 0)), "a?(??????z\xf0\x9f\x98\x80");
    assert_non_null(strstr(s, "a\\u0000b"));
    json_decref(o);
    free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_members),
        cmocka_unit_test(test_invalid_utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
