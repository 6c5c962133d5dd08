/* Live-streaming decoders and assembler (worker/src/stream/), data-driven: each folder
 * $PQ_TEST_DATA/stream/<format>/<case>/ holds input.sse (the raw upstream body), optional
 * limits.json ({"max_event_bytes", "max_bytes"}: decoder and assembler caps), expected.json and
 * optionally relay.txt.
 *
 * format "sse": the raw SSE decoder; expected.json is {"events": [{"type", "data", "id"[,
 * "retry"]}], "cut": bool[, "error": "too_large"]}.
 * formats openai, azure, anthropic, gemini, watsonx: expected.json is what the case comes to:
 * {"end": "clean" | "cut" | "error", "completion": {chat.completion, created 1700000000 and model
 * "fallback-model" when the stream gave none}[, "error": pq_err_name, "code", "message"][,
 * "mid_event": true]} or, when the decoder fails, {"feed_error": pq_err_name, "errstr"}.
 * relay.txt: pq_stream_chunk_render of every chunk, one per line.
 *
 * Each case is fed whole, one byte at a time, and in 25 random splits (fixed seed); every way
 * must give the expected result. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <sys/stat.h>

#include "promptq/util.h"
#include "stream/sse.h"
#include "stream/stream.h"

#define FALLBACK_CREATED 1700000000
#define FALLBACK_MODEL   "fallback-model"
#define RANDOM_SPLITS    25

static const char *data_dir(void)
{
    const char *d = getenv("PQ_TEST_DATA");
    return d ? d : "tests/data";
}

static char *read_case_file(const char *name, const char *file, size_t *len)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/stream/%s/%s", data_dir(), name, file);
    return pq_file_read(path, 16 * 1024 * 1024, len);
}

static json_t *load_case_json(const char *name, const char *file)
{
    char path[1024];
    json_error_t err;
    snprintf(path, sizeof(path), "%s/stream/%s/%s", data_dir(), name, file);
    return json_load_file(path, 0, &err);
}

static uint64_t rng_state;

static uint64_t rng(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

/* How a feed splits the input: whole, byte by byte, or random pieces of 1..max bytes. */
typedef enum { SPLIT_WHOLE, SPLIT_BYTES, SPLIT_RANDOM } split_t;

static size_t next_piece(split_t how, size_t left)
{
    size_t n;
    if (how == SPLIT_WHOLE)
        return left;
    if (how == SPLIT_BYTES)
        return 1;
    n = 1 + (size_t)(rng() % (rng() % 4 == 0 ? 200 : 12));
    return n < left ? n : left;
}

/* ---- raw SSE ---- */

static pq_err_t sse_collect(const pq_sse_event_t *ev, void *opaque)
{
    json_t *ob = json_pack("{s:s%, s:s%, s:s%}", "type", ev->type, ev->type_len, "data", ev->data,
                           ev->data_len, "id", ev->id, ev->id_len);
    assert_non_null(ob);
    if (ev->retry_ms >= 0)
        json_object_set_new(ob, "retry", json_integer(ev->retry_ms));
    json_array_append_new(opaque, ob);
    return PQ_OK;
}

static json_t *run_sse(const char *in, size_t len, size_t max, split_t how)
{
    pq_sse_t *sse = pq_sse_new(max);
    json_t *events = json_array(), *res;
    pq_err_t err = PQ_OK;
    size_t off = 0;

    assert_non_null(sse);
    while (off < len && err == PQ_OK) {
        size_t n = next_piece(how, len - off);
        err = pq_sse_feed(sse, in + off, n, sse_collect, events);
        off += n;
    }
    res = json_pack("{s:o, s:b}", "events", events, "cut", pq_sse_finish(sse));
    if (err != PQ_OK)
        json_object_set_new(res, "error", json_string(pq_err_name(err)));
    pq_sse_destroy(sse);
    return res;
}

/* ---- formats ---- */

typedef struct {
    pq_stream_asm_t *a;
    char *relay; /* rendered chunks, one per line */
    size_t relay_len;
} sink_t;

static pq_err_t sink_cb(const pq_stream_chunk_t *chunk, void *opaque)
{
    sink_t *s = opaque;
    size_t n;
    char *line =
        pq_stream_chunk_render(chunk, FALLBACK_MODEL, FALLBACK_CREATED, chunk->error_text, &n);

    assert_non_null(line);
    assert_null(memchr(line, '\n', n));
    if (chunk->kind != PQ_STREAM_CHUNK_DONE) {
        json_error_t jerr;
        json_t *doc = json_loads(line, 0, &jerr);
        if (!doc)
            fail_msg("rendered chunk is not JSON: %s", line);
        json_decref(doc);
    }
    s->relay = realloc(s->relay, s->relay_len + n + 2);
    memcpy(s->relay + s->relay_len, line, n);
    s->relay_len += n;
    s->relay[s->relay_len++] = '\n';
    s->relay[s->relay_len] = '\0';
    free(line);
    return pq_stream_asm_add(s->a, chunk);
}

static pq_stream_format_t format_of(const char *name)
{
    char type[64];
    size_t n = strcspn(name, "/");
    snprintf(type, sizeof(type), "%.*s", (int)n, name);
    if (strcmp(type, "azure") == 0)
        return pq_stream_format_for("azure_openai");
    return pq_stream_format_for(type);
}

static json_t *run_format(pq_stream_format_t fmt, const char *in, size_t len, size_t max_event,
                          size_t max_bytes, split_t how, char **relay)
{
    char errstr[128];
    pq_stream_t *st = pq_stream_new(fmt, max_event, errstr, sizeof(errstr));
    sink_t s = {pq_stream_asm_new(max_bytes), NULL, 0};
    static const char *const ends[] = {"cut", "clean", "error"};
    json_t *res, *completion;
    pq_err_t err = PQ_OK;
    size_t off = 0;
    int mid;

    assert_non_null(st);
    assert_non_null(s.a);
    while (off < len && err == PQ_OK) {
        size_t n = next_piece(how, len - off);
        err = pq_stream_feed(st, in + off, n, sink_cb, &s);
        off += n;
    }
    mid = pq_stream_finish(st);
    if (err != PQ_OK) {
        res =
            json_pack("{s:s, s:s}", "feed_error", pq_err_name(err), "errstr", pq_stream_errstr(st));
    } else {
        const char *code, *text;
        pq_err_t perr = pq_stream_asm_error(s.a, &code, &text);
        completion = pq_stream_asm_completion(s.a, FALLBACK_MODEL, FALLBACK_CREATED);
        assert_non_null(completion);
        res =
            json_pack("{s:s, s:o}", "end", ends[pq_stream_asm_end(s.a)], "completion", completion);
        if (perr != PQ_OK) {
            json_object_set_new(res, "error", json_string(pq_err_name(perr)));
            json_object_set_new(res, "code", json_string(code));
            json_object_set_new(res, "message", json_string(text));
        }
        if (mid)
            json_object_set_new(res, "mid_event", json_true());
    }
    *relay = s.relay;
    pq_stream_asm_destroy(s.a);
    pq_stream_destroy(st);
    return res;
}

static void compare(const char *name, const char *how, json_t *want, json_t *got)
{
    if (!json_equal(want, got)) {
        char *w = json_dumps(want, JSON_INDENT(1) | JSON_SORT_KEYS);
        char *g = json_dumps(got, JSON_INDENT(1) | JSON_SORT_KEYS);
        print_error("%s (%s):\nexpected %s\n     got %s\n", name, how, w, g);
        free(w);
        free(g);
        fail();
    }
}

static void test_case(void **state)
{
    const char *name = *state;
    static const char *const hows[] = {"whole", "bytes", "random"};
    json_t *want = load_case_json(name, "expected.json"), *limits;
    size_t len, relay_len = 0, max_event = 0, max_bytes = 0;
    char *in = read_case_file(name, "input.sse", &len);
    char *relay_want = read_case_file(name, "relay.txt", &relay_len);
    int is_sse = strncmp(name, "sse/", 4) == 0;

    if (!in || !want)
        fail_msg("%s: cannot read input.sse or expected.json", name);
    limits = load_case_json(name, "limits.json");
    if (limits) {
        max_event = (size_t)json_integer_value(json_object_get(limits, "max_event_bytes"));
        max_bytes = (size_t)json_integer_value(json_object_get(limits, "max_bytes"));
        json_decref(limits);
    }
    rng_state = 0x5DEECE66Dull ^ (uint64_t)len;
    for (int h = 0; h < 3; h++) {
        int times = h == SPLIT_RANDOM ? RANDOM_SPLITS : 1;
        for (int t = 0; t < times; t++) {
            char *relay = NULL;
            json_t *got = is_sse ? run_sse(in, len, max_event, (split_t)h)
                                 : run_format(format_of(name), in, len, max_event, max_bytes,
                                              (split_t)h, &relay);
            compare(name, hows[h], want, got);
            if (relay_want && strcmp(relay_want, relay ? relay : "") != 0) {
                print_error("%s (%s): relay\nexpected %s\n     got %s\n", name, hows[h], relay_want,
                            relay ? relay : "");
                fail();
            }
            free(relay);
            json_decref(got);
        }
    }
    free(relay_want);
    free(in);
    json_decref(want);
}

/* ---- fixed tests ---- */

/* A decoder that failed stays failed, and says so without reading more. */
static void test_sticky_errors(void **state)
{
    pq_sse_t *sse = pq_sse_new(8);
    assert_int_equal(pq_sse_feed(sse, "data: 0123456789\n", 17, NULL, NULL), PQ_ERR_TOO_LARGE);
    assert_int_equal(pq_sse_feed(sse, "data: x\n\n", 9, NULL, NULL), PQ_ERR_TOO_LARGE);
    pq_sse_destroy(sse);
    pq_sse_destroy(NULL);
    pq_stream_destroy(NULL);
    pq_stream_asm_destroy(NULL);
}

/* An assembler over its cap refuses every later chunk too. */
static void test_asm_cap_sticky(void **state)
{
    pq_stream_asm_t *a = pq_stream_asm_new(4);
    pq_stream_chunk_t c = {.kind = PQ_STREAM_CHUNK_DELTA, .text = "hello", .text_len = 5};
    pq_stream_chunk_t u = {.kind = PQ_STREAM_CHUNK_USAGE, .prompt_tokens = 1};

    assert_int_equal(pq_stream_asm_add(a, &c), PQ_ERR_TOO_LARGE);
    assert_int_equal(pq_stream_asm_add(a, &u), PQ_ERR_TOO_LARGE);
    pq_stream_asm_destroy(a);
}

static void test_format_for(void **state)
{
    assert_int_equal(pq_stream_format_for("openai"), PQ_STREAM_OPENAI);
    assert_int_equal(pq_stream_format_for("azure_openai"), PQ_STREAM_OPENAI);
    assert_int_equal(pq_stream_format_for("anthropic"), PQ_STREAM_ANTHROPIC);
    assert_int_equal(pq_stream_format_for("gemini"), PQ_STREAM_GEMINI);
    assert_int_equal(pq_stream_format_for("watsonx"), PQ_STREAM_WATSONX);
    assert_int_equal(pq_stream_format_for(NULL), PQ_STREAM_OPENAI);
}

static pq_err_t text_cb(const pq_stream_chunk_t *chunk, void *opaque)
{
    char *out = opaque;
    if (chunk->kind == PQ_STREAM_CHUNK_DELTA && chunk->text)
        strncat(out, chunk->text, chunk->text_len);
    return PQ_OK;
}

/* stream_malformed "skip": a malformed event that gave nothing is skipped and counted; the
 * default fails the stream at it. */
static void test_skip_malformed(void **state)
{
    static const char body[] =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n"
        "data: {not json\n\n"
        "data: {\"choices\":5}\n\n"
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}]}\n\n"
        "data: [DONE]\n\n";
    char text[64] = "", errstr[64];
    pq_stream_t *st = pq_stream_new(PQ_STREAM_OPENAI, 0, errstr, sizeof(errstr));

    (void)state;
    assert_int_equal(pq_stream_feed(st, body, sizeof(body) - 1, text_cb, text), PQ_ERR_MALFORMED);
    assert_string_equal(text, "a");
    assert_non_null(strstr(pq_stream_errstr(st), "event 2"));
    assert_int_equal(pq_stream_skipped(st), 0);
    pq_stream_destroy(st);

    text[0] = '\0';
    st = pq_stream_new(PQ_STREAM_OPENAI, 0, errstr, sizeof(errstr));
    pq_stream_skip_malformed(st, 1);
    assert_int_equal(pq_stream_feed(st, body, sizeof(body) - 1, text_cb, text), PQ_OK);
    assert_string_equal(text, "ab");
    assert_int_equal(pq_stream_skipped(st), 2);
    assert_string_equal(pq_stream_errstr(st), "");
    pq_stream_destroy(st);
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(void)
{
    static const struct CMUnitTest fixed[] = {
        cmocka_unit_test(test_sticky_errors),
        cmocka_unit_test(test_asm_cap_sticky),
        cmocka_unit_test(test_format_for),
        cmocka_unit_test(test_skip_malformed),
    };
    size_t n = 0, cap = 0, nfixed = sizeof(fixed) / sizeof(fixed[0]);
    char path[1024], **names = NULL;
    struct CMUnitTest *tests;
    struct dirent *fde, *cde;
    DIR *fdir, *cdir;
    int rc;

    snprintf(path, sizeof(path), "%s/stream", data_dir());
    if (!(fdir = opendir(path))) {
        fprintf(stderr, "cannot open %s (set PQ_TEST_DATA)\n", path);
        return 1;
    }
    while ((fde = readdir(fdir))) {
        char fpath[1300];
        if (fde->d_name[0] == '.')
            continue;
        snprintf(fpath, sizeof(fpath), "%s/%s", path, fde->d_name);
        if (!(cdir = opendir(fpath)))
            continue; /* README.md */
        while ((cde = readdir(cdir))) {
            char cpath[1600];
            struct stat st;
            if (cde->d_name[0] == '.')
                continue;
            snprintf(cpath, sizeof(cpath), "%s/%s", fpath, cde->d_name);
            if (stat(cpath, &st) != 0 || !S_ISDIR(st.st_mode))
                continue;
            if (n == cap) {
                cap = cap ? cap * 2 : 64;
                names = realloc(names, cap * sizeof(*names));
                assert_non_null(names);
            }
            snprintf(cpath, sizeof(cpath), "%s/%s", fde->d_name, cde->d_name);
            names[n++] = strdup(cpath);
        }
        closedir(cdir);
    }
    closedir(fdir);
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
    rc = _cmocka_run_group_tests("stream", tests, n + nfixed, NULL, NULL);
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    free(tests);
    return rc;
}
