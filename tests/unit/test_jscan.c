/* The strict JSON scanner (common/src/jscan.c): what it accepts and refuses next to jansson
 * (json_loadb with JSON_ALLOW_NUL | JSON_DECODE_ANY), and walking a checked text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <jansson.h>

#include "promptq/jscan.h"

static int jansson_ok(const char *s, size_t n)
{
    json_t *j = json_loadb(s, n, JSON_ALLOW_NUL | JSON_DECODE_ANY, NULL);
    json_decref(j);
    return j != NULL;
}

static void same_as_jansson(const char *s, size_t n, int want)
{
    pq_js_t v;
    int ok = pq_js_check(s, n, 2048, &v, NULL) == 0;

    if (ok != want || jansson_ok(s, n) != want)
        fail_msg("%.*s: scanner %d, jansson %d, expected %d", (int)n, s, ok, jansson_ok(s, n),
                 want);
}

#define ACCEPT(lit) same_as_jansson(lit, sizeof(lit) - 1, 1)
#define REFUSE(lit) same_as_jansson(lit, sizeof(lit) - 1, 0)

static void test_accepts_what_jansson_does(void **state)
{
    (void)state;
    ACCEPT("{}");
    ACCEPT(" [ ] ");
    ACCEPT("{\"a\":[1,-0,0.5,1e3,1E-3,-12.5e+2,true,false,null,\"x\"]}");
    ACCEPT("\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\ud83d\\ude00\"");
    ACCEPT("\"a\\u0000b\""); /* NUL in a value: JSON_ALLOW_NUL */
    ACCEPT("\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"");
    ACCEPT("9223372036854775807");
    ACCEPT("-9223372036854775808");
    ACCEPT("1e-400"); /* underflow is 0 for jansson too */
    ACCEPT("\n\t\r {\"k\" : { \"n\" : [ [ ] , { } ] } }\n");
}

static void test_refuses_what_jansson_does(void **state)
{
    (void)state;
    REFUSE("");
    REFUSE("   ");
    REFUSE("{");
    REFUSE("{\"a\":1,}");
    REFUSE("[1,]");
    REFUSE("[1 2]");
    REFUSE("{\"a\" 1}");
    REFUSE("{a:1}");
    REFUSE("01");
    REFUSE("-");
    REFUSE("1.");
    REFUSE(".5");
    REFUSE("1e");
    REFUSE("+1");
    REFUSE("9223372036854775808"); /* too big integer */
    REFUSE("-9223372036854775809");
    REFUSE("1e400"); /* real overflow */
    REFUSE("tru");
    REFUSE("truex");
    REFUSE("nul");
    REFUSE("{} {}");
    REFUSE("{}x");
    REFUSE("\"a\tb\""); /* raw control character */
    REFUSE("\"\\x\"");
    REFUSE("\"\\u12\"");
    REFUSE("\"\\ud83d\""); /* lone high surrogate */
    REFUSE("\"\\ud83dx\"");
    REFUSE("\"\\ude00\""); /* lone low surrogate */
    REFUSE("\"\\ud83d\\u0041\"");
    REFUSE("\"\xc0\xaf\"");         /* overlong */
    REFUSE("\"\xe0\x80\xaf\"");     /* overlong */
    REFUSE("\"\xed\xa0\x80\"");     /* surrogate in UTF-8 */
    REFUSE("\"\xf4\x90\x80\x80\""); /* above U+10FFFF */
    REFUSE("\"\xc3\"");             /* cut */
    REFUSE("\"\x80\"");
    REFUSE("\"\xff\"");
    REFUSE("\"abc");
    REFUSE("{\"a\\u0000\":1}");        /* NUL in a name: jansson refuses it even with ALLOW_NUL */
    same_as_jansson("\"a\0b\"", 5, 0); /* a raw NUL byte */
    same_as_jansson("{}\0", 3, 0);
}

static void test_depth_and_fault(void **state)
{
    char deep[80];
    pq_js_t v;
    size_t at = 0;
    (void)state;

    memset(deep, '[', 40);
    memset(deep + 40, ']', 40);
    assert_int_equal(pq_js_check(deep, 80, 40, &v, NULL), 0);
    assert_int_equal(v.type, PQ_JS_ARRAY);
    assert_int_equal(pq_js_check(deep, 80, 39, &v, &at), -1);
    assert_int_equal(at, 39);
    assert_int_equal(v.type, PQ_JS_NONE);
    assert_int_equal(pq_js_check("1", 1, 0, &v, NULL), 0);
    assert_int_equal(pq_js_check("[]", 2, 0, &v, NULL), -1);
    assert_int_equal(pq_js_check("{\"a\":[1,2,}", 11, 8, &v, &at), -1);
    assert_int_equal(at, 10);
}

static void test_walk(void **state)
{
    const char *s =
        " {\"id\": \"c-1\", \"n\": -42, \"r\": 2.5e1, \"list\": [ {\"x\": \"}]\\\"\"}, [], "
        "null, true ], \"o\": {}, \"esc\\u0041\": 1, \"id\": \"second\"} ";
    pq_js_t root, v, k, e;
    pq_js_iter_t it;
    int64_t n = 0;
    int count = 0;
    (void)state;

    assert_int_equal(pq_js_check(s, strlen(s), 8, &root, NULL), 0);
    assert_int_equal(root.type, PQ_JS_OBJECT);
    assert_int_equal(root.p[0], '{');
    assert_int_equal(root.p[root.n - 1], '}');
    assert_true(pq_js_get(&root, "id", &v));
    assert_true(pq_js_str_is(&v, "c-1")); /* the first of two */
    assert_true(pq_js_get(&root, "n", &v));
    assert_int_equal(v.type, PQ_JS_INTEGER);
    assert_int_equal(pq_js_int(&v, &n), 0);
    assert_int_equal(n, -42);
    assert_true(pq_js_get(&root, "r", &v));
    assert_int_equal(v.type, PQ_JS_REAL);
    assert_int_equal(pq_js_int(&v, &n), -1);
    assert_false(pq_js_get(&root, "escA", &v)); /* names compare as written */
    assert_int_equal(v.type, PQ_JS_NONE);
    assert_true(pq_js_get(&root, "list", &v));
    assert_int_equal(v.type, PQ_JS_ARRAY);
    pq_js_iter(&v, &it);
    while (pq_js_next_elem(&it, &e)) {
        static const pq_js_type_t types[] = {PQ_JS_OBJECT, PQ_JS_ARRAY, PQ_JS_NULL, PQ_JS_TRUE};
        assert_true(count < 4);
        assert_int_equal(e.type, types[count]);
        if (count == 0) {
            assert_true(pq_js_get(&e, "x", &k));
            assert_int_equal(k.n, 6); /* "}]\"" with its quotes */
            assert_false(pq_js_str_plain(&k));
        }
        count++;
    }
    assert_int_equal(count, 4);
    assert_true(pq_js_get(&root, "o", &v));
    pq_js_iter(&v, &it);
    assert_false(pq_js_next_member(&it, &k, &e));
    assert_false(pq_js_unique_names(&root, 64)); /* "id" twice (and an escaped name) */
    assert_true(pq_js_unique_names(&v, 64));
    s = "{\"a\":1,\"b\":{\"a\":2},\"c\":3}";
    assert_int_equal(pq_js_check(s, strlen(s), 8, &root, NULL), 0);
    assert_true(pq_js_unique_names(&root, 64));
    assert_false(pq_js_unique_names(&root, 2)); /* more members than it may compare */
    s = "{\"a\\u0062\":1}";
    assert_int_equal(pq_js_check(s, strlen(s), 8, &root, NULL), 0);
    assert_false(pq_js_unique_names(&root, 64));
    /* walking something that is no container finds nothing */
    assert_true(pq_js_get(&root, "ab", &v) == 0);
    s = "\"str\"";
    assert_int_equal(pq_js_check(s, strlen(s), 8, &root, NULL), 0);
    pq_js_iter(&root, &it);
    assert_false(pq_js_next_elem(&it, &e));
    assert_false(pq_js_get(&root, "x", &v));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accepts_what_jansson_does),
        cmocka_unit_test(test_refuses_what_jansson_does),
        cmocka_unit_test(test_depth_and_fault),
        cmocka_unit_test(test_walk),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
