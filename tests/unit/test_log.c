/* The log writer (common/src/log.c): with log.json every line is one JSON object, whatever the
 * message quotes: quotes, backslashes, control bytes, well-formed UTF-8 kept as it is, and
 * bytes that are not UTF-8 (a Kafka key, a provider's bytes) replaced by U+FFFD. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include <jansson.h>

#include "promptq/log.h"

/* Logs msg at info with log.json on, stderr sent to a file for the call; returns the line. */
static char *log_line(const char *msg)
{
    char path[] = "/tmp/pq-test-log-XXXXXX", *line = NULL;
    int fd = mkstemp(path), saved = dup(STDERR_FILENO);
    size_t cap = 0;
    FILE *f;

    assert_true(fd >= 0 && saved >= 0);
    assert_true(dup2(fd, STDERR_FILENO) >= 0);
    pq_log_init("promptq-test", PQ_LOG_INFO, 1);
    PQ_INFO("%s", msg);
    assert_true(dup2(saved, STDERR_FILENO) >= 0);
    close(saved);
    assert_non_null(f = fdopen(fd, "r"));
    rewind(f);
    assert_true(getline(&line, &cap, f) > 0);
    assert_int_equal(fgetc(f), EOF); /* one line */
    fclose(f);
    unlink(path);
    return line;
}

static json_t *parse(const char *line)
{
    json_error_t err;
    json_t *doc = json_loads(line, 0, &err);

    if (!doc)
        fail_msg("not JSON (%s): %s", err.text, line);
    assert_true(json_is_object(doc));
    assert_string_equal(json_string_value(json_object_get(doc, "level")), "info");
    assert_string_equal(json_string_value(json_object_get(doc, "prog")), "promptq-test");
    assert_true(json_is_integer(json_object_get(doc, "pid")));
    return doc;
}

static void test_escapes(void **state)
{
    char *line = log_line("say \"hi\" \\ tab\there\x01 nl\n end");
    json_t *doc = parse(line);

    (void)state;
    assert_string_equal(json_string_value(json_object_get(doc, "msg")),
                        "say \"hi\" \\ tab\there\x01 nl\n end");
    json_decref(doc);
    free(line);
}

static void test_utf8(void **state)
{
    /* kept: é (2 bytes), € (3), 😀 (4); replaced: a lone continuation byte, a truncated
     * sequence, an overlong "/", a surrogate, 0xFF, a code point above U+10FFFF */
    char *line = log_line("\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 | \x80 \xe2\x82 \xc0\xaf "
                          "\xed\xa0\x80 \xff \xf4\x90\x80\x80 end");
    json_t *doc = parse(line);
    const char *msg = json_string_value(json_object_get(doc, "msg"));

    (void)state;
    assert_non_null(msg);
    assert_non_null(strstr(msg, "\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 | "));
    assert_null(strchr(msg, '\xff'));
    assert_non_null(strstr(msg, "\xef\xbf\xbd")); /* U+FFFD */
    assert_non_null(strstr(msg, " end"));
    json_decref(doc);
    free(line);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_escapes),
        cmocka_unit_test(test_utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
