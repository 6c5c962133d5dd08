/* libFuzzer target for the live-streaming decoders and assembler (worker/src/stream/). The
 * first byte picks the format (OpenAI, Anthropic, Gemini, watsonx) and the split pattern; the
 * rest is the upstream body. Besides "no crash, no leak", it checks that the body gives the same
 * result fed whole and fed in pieces (the decoders must not depend on chunk boundaries), that
 * every chunk renders as one line of JSON (or [DONE]), and that the assembled completion is a
 * chat.completion that dumps. Small caps so the fuzzer reaches the limit paths. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "stream/stream.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_MAX_EVENT 4096
#define FUZZ_MAX_BYTES 8192

static pq_err_t sink(const pq_stream_chunk_t *chunk, void *opaque)
{
    size_t n = 0;
    char *line = pq_stream_chunk_render(chunk, "m", 1, chunk->error_text, &n);

    if (!line || memchr(line, '\n', n) || strlen(line) != n)
        abort();
    if (chunk->kind != PQ_STREAM_CHUNK_DONE) {
        json_t *doc = json_loadb(line, n, 0, NULL);
        if (!json_is_object(doc))
            abort();
        json_decref(doc);
    }
    free(line);
    return pq_stream_asm_add(opaque, chunk);
}

/* The result of one run as text: the error and errstr, or the end state and completion. */
static char *run(pq_stream_format_t fmt, const char *buf, size_t len, unsigned split)
{
    char errstr[128], *out, *doc;
    pq_stream_t *st = pq_stream_new(fmt, FUZZ_MAX_EVENT, errstr, sizeof(errstr));
    pq_stream_asm_t *a = pq_stream_asm_new(FUZZ_MAX_BYTES);
    pq_err_t err = PQ_OK;
    size_t off = 0, step = 1 + split % 7;
    json_t *c;

    if (!st || !a)
        abort();
    while (off < len && err == PQ_OK) {
        size_t n = split ? step : len - off;
        if (n > len - off)
            n = len - off;
        err = pq_stream_feed(st, buf + off, n, sink, a);
        off += n;
        step = 1 + (step * 5 + 3) % 13;
    }
    pq_stream_finish(st);
    if (err != PQ_OK) {
        if (!pq_stream_errstr(st)[0])
            abort(); /* a failure says why */
        if (asprintf(&out, "error %d %s", (int)err, pq_stream_errstr(st)) < 0)
            abort();
        goto out;
    }
    c = pq_stream_asm_completion(a, "m", 1);
    if (!c || !json_is_array(json_object_get(c, "choices")))
        abort();
    doc = json_dumps(c, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(c);
    if (!doc || asprintf(&out, "end %d %s", (int)pq_stream_asm_end(a), doc) < 0)
        abort();
    free(doc);
out:
    pq_stream_asm_destroy(a);
    pq_stream_destroy(st);
    return out;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    pq_stream_format_t fmt;
    char *whole, *split;

    if (size < 1)
        return 0;
    fmt = (pq_stream_format_t)(data[0] % 4);
    whole = run(fmt, (const char *)data + 1, size - 1, 0);
    split = run(fmt, (const char *)data + 1, size - 1, 1u + data[0] / 4);
    if (strcmp(whole, split) != 0)
        abort(); /* the result depends on where the body was split */
    free(whole);
    free(split);
    return 0;
}
