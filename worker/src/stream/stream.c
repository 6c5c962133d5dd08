/* Upstream stream decoders: SSE events (sse.h) to chunks, one decoder per format; see
 * stream.h. */
#include "stream.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sse.h"

/* Most Anthropic content blocks tracked in one message (PQ_ERR_MALFORMED beyond). */
#define MAX_BLOCKS 256

struct pq_stream_s {
    pq_stream_format_t format;
    pq_sse_t *sse;
    pq_stream_chunk_cb cb; /* set for the duration of pq_stream_feed */
    void *opaque;
    char *id, *model;
    int64_t created;
    int64_t prompt, completion; /* Anthropic: input from message_start, output from deltas */
    unsigned roles_sent;        /* Gemini: choices whose role went out */
    int block_tool[MAX_BLOCKS]; /* Anthropic: content block -> tool index, -1 for none */
    int ntools;
    uint64_t event_no;
    int skip_malformed; /* pq_stream_skip_malformed */
    uint64_t skipped;   /* malformed events skipped */
    uint64_t emitted;   /* chunks handed to the callback */
    char errstr[128];
};

pq_stream_format_t pq_stream_format_for(const char *type)
{
    if (!type)
        return PQ_STREAM_OPENAI;
    if (strcmp(type, "anthropic") == 0)
        return PQ_STREAM_ANTHROPIC;
    if (strcmp(type, "gemini") == 0)
        return PQ_STREAM_GEMINI;
    if (strcmp(type, "watsonx") == 0)
        return PQ_STREAM_WATSONX;
    return PQ_STREAM_OPENAI;
}

pq_stream_t *pq_stream_new(pq_stream_format_t format, size_t max_event_bytes, char *errstr,
                           size_t errstr_size)
{
    pq_stream_t *st = calloc(1, sizeof(*st));

    if (!st || !(st->sse = pq_sse_new(max_event_bytes))) {
        free(st);
        snprintf(errstr, errstr_size, "out of memory");
        return NULL;
    }
    st->format = format;
    for (size_t i = 0; i < MAX_BLOCKS; i++)
        st->block_tool[i] = -1;
    return st;
}

void pq_stream_destroy(pq_stream_t *st)
{
    if (!st)
        return;
    pq_sse_destroy(st->sse);
    free(st->id);
    free(st->model);
    free(st);
}

const char *pq_stream_errstr(const pq_stream_t *st)
{
    return st->errstr;
}

int pq_stream_finish(pq_stream_t *st)
{
    return pq_sse_finish(st->sse);
}

/* ---- helpers ---- */

static pq_err_t fail(pq_stream_t *st, pq_err_t err, const char *what)
{
    snprintf(st->errstr, sizeof(st->errstr), "event %llu: %s", (unsigned long long)st->event_no,
             what);
    return err;
}

/* Replaces *slot with a copy of the string v when v is a non-empty string. */
static pq_err_t keep_str(char **slot, const json_t *v)
{
    const char *s = json_string_value(v);
    char *copy;

    if (!s || !*s || (*slot && strcmp(*slot, s) == 0))
        return PQ_OK;
    if (!(copy = strdup(s)))
        return PQ_ERR_NOMEM;
    free(*slot);
    *slot = copy;
    return PQ_OK;
}

static void chunk_init(pq_stream_t *st, pq_stream_chunk_t *c, pq_stream_chunk_kind_t kind)
{
    memset(c, 0, sizeof(*c));
    c->kind = kind;
    c->id = st->id;
    c->model = st->model;
    c->created = st->created;
}

static pq_err_t fail(pq_stream_t *st, pq_err_t err, const char *what);

/* Hands a chunk to the caller; a refusal is remembered with the event it came from. */
static pq_err_t emit(pq_stream_t *st, const pq_stream_chunk_t *c)
{
    pq_err_t err = st->cb ? st->cb(c, st->opaque) : PQ_OK;

    st->emitted++;
    if (err == PQ_ERR_TOO_LARGE)
        return fail(st, err, "answer over the size cap");
    if (err != PQ_OK)
        return fail(st, err, pq_err_name(err));
    return PQ_OK;
}

/* A provider's error word ("overloaded_error", "RESOURCE_EXHAUSTED") copied when it is only
 * letters and underscores (such words cannot be a key fragment, G6), else "". */
static void safe_word(const json_t *v, char *buf, size_t size)
{
    const char *s = json_string_value(v);
    size_t n = s ? strlen(s) : 0;

    buf[0] = '\0';
    if (n == 0 || n >= size)
        return;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') || s[i] == '_'))
            return;
    memcpy(buf, s, n + 1);
}

/* The error class for a provider's error word and/or HTTP-like status (0: none). An error in
 * the middle of a stream is the provider's trouble unless it says otherwise: SERVER. */
static pq_err_t error_class(const char *word, json_int_t status)
{
    static const struct {
        const char *word;
        pq_err_t err;
    } map[] = {
        {"overloaded_error", PQ_ERR_OVERLOADED},
        {"overloaded", PQ_ERR_OVERLOADED},
        {"rate_limit_error", PQ_ERR_RATE_LIMITED},
        {"rate_limit_exceeded", PQ_ERR_RATE_LIMITED},
        {"RESOURCE_EXHAUSTED", PQ_ERR_RATE_LIMITED},
        {"context_length_exceeded", PQ_ERR_CONTEXT_LENGTH},
        {"content_filter", PQ_ERR_CONTENT_FILTER},
        {"content_policy_violation", PQ_ERR_CONTENT_FILTER},
        {"invalid_request_error", PQ_ERR_REFUSED},
        {"INVALID_ARGUMENT", PQ_ERR_REFUSED},
        {"FAILED_PRECONDITION", PQ_ERR_REFUSED},
        {"authentication_error", PQ_ERR_AUTH},
        {"permission_error", PQ_ERR_AUTH},
        {"UNAUTHENTICATED", PQ_ERR_AUTH},
        {"PERMISSION_DENIED", PQ_ERR_AUTH},
        {"not_found_error", PQ_ERR_NOT_FOUND},
        {"NOT_FOUND", PQ_ERR_NOT_FOUND},
        {"timeout_error", PQ_ERR_TIMEOUT},
        {"DEADLINE_EXCEEDED", PQ_ERR_TIMEOUT},
    };

    for (size_t i = 0; word && i < sizeof(map) / sizeof(map[0]); i++)
        if (strcmp(word, map[i].word) == 0)
            return map[i].err;
    if (status >= 400 && status <= 599) {
        pq_err_t e = pq_err_from_http_status((long)status);
        if (e != PQ_OK)
            return e;
    }
    return PQ_ERR_SERVER;
}

/* Emits an ERROR chunk. code_v/type_v: the error's code and type values (either may be NULL;
 * the first plain word wins); msg: its message; status: an HTTP-like status or 0. */
static pq_err_t emit_error(pq_stream_t *st, const json_t *code_v, const json_t *type_v,
                           const json_t *msg, json_int_t status)
{
    pq_stream_chunk_t c;
    char word[64];

    safe_word(code_v, word, sizeof(word));
    if (!word[0])
        safe_word(type_v, word, sizeof(word));
    chunk_init(st, &c, PQ_STREAM_CHUNK_ERROR);
    c.error = error_class(word[0] ? word : NULL, status);
    c.error_code = word;
    c.error_text = json_is_string(msg) ? json_string_value(msg) : "";
    return emit(st, &c);
}

static pq_err_t emit_usage(pq_stream_t *st, int64_t prompt, int64_t completion, int64_t total)
{
    pq_stream_chunk_t c;

    chunk_init(st, &c, PQ_STREAM_CHUNK_USAGE);
    c.prompt_tokens = prompt;
    c.completion_tokens = completion;
    c.total_tokens = total ? total : prompt + completion;
    return emit(st, &c);
}

static int64_t usage_int(const json_t *obj, const char *name)
{
    json_t *v = json_object_get(obj, name);
    return json_is_integer(v) && json_integer_value(v) > 0 ? (int64_t)json_integer_value(v) : 0;
}

/* OpenAI's finish reasons, from the OpenAI and watsonx words. NULL for none (null, ""). */
static const char *finish_openai(const char *r)
{
    if (!r || !*r)
        return NULL;
    if (strcmp(r, "length") == 0 || strcmp(r, "max_tokens") == 0 || strcmp(r, "time_limit") == 0)
        return "length";
    if (strcmp(r, "tool_calls") == 0 || strcmp(r, "function_call") == 0)
        return "tool_calls";
    if (strcmp(r, "content_filter") == 0)
        return "content_filter";
    return "stop";
}

static const char *finish_anthropic(const char *r)
{
    if (!r || !*r)
        return NULL;
    if (strcmp(r, "max_tokens") == 0 || strcmp(r, "model_context_window_exceeded") == 0)
        return "length";
    if (strcmp(r, "tool_use") == 0)
        return "tool_calls";
    if (strcmp(r, "refusal") == 0)
        return "content_filter";
    return "stop"; /* end_turn, stop_sequence, pause_turn */
}

static const char *finish_gemini(const char *r)
{
    static const char *const filtered[] = {
        "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", NULL};
    if (!r || !*r || strcmp(r, "FINISH_REASON_UNSPECIFIED") == 0)
        return NULL;
    if (strcmp(r, "MAX_TOKENS") == 0)
        return "length";
    for (size_t i = 0; filtered[i]; i++)
        if (strcmp(r, filtered[i]) == 0)
            return "content_filter";
    return "stop";
}

/* A choice or tool index from v (default dflt when absent), checked against max. */
static int index_of(const json_t *v, size_t dflt, int max)
{
    json_int_t i = json_is_integer(v) ? json_integer_value(v) : (json_int_t)dflt;
    return i >= 0 && i < max ? (int)i : -1;
}

/* ---- OpenAI and watsonx ---- */

static pq_err_t openai_choice(pq_stream_t *st, const json_t *ch, size_t pos)
{
    json_t *delta = json_object_get(ch, "delta"), *calls, *tc;
    json_t *content, *role;
    const char *finish = finish_openai(json_string_value(json_object_get(ch, "finish_reason")));
    pq_stream_chunk_t c;
    int index = index_of(json_object_get(ch, "index"), pos, PQ_STREAM_MAX_CHOICES), sent = 0;
    size_t i;
    pq_err_t err;

    if (!json_is_object(ch) || index < 0)
        return fail(st, PQ_ERR_MALFORMED, "bad choice or choice index");
    if (delta && !json_is_object(delta) && !json_is_null(delta))
        return fail(st, PQ_ERR_MALFORMED, "delta is not an object");
    content = json_object_get(delta, "content");
    role = json_object_get(delta, "role");
    calls = json_object_get(delta, "tool_calls");
    if ((content && !json_is_string(content) && !json_is_null(content)) ||
        (calls && !json_is_array(calls) && !json_is_null(calls)))
        return fail(st, PQ_ERR_MALFORMED, "bad delta");

    chunk_init(st, &c, PQ_STREAM_CHUNK_DELTA);
    c.index = index;
    c.role = json_string_value(role);
    if (json_string_length(content) > 0) {
        c.text = json_string_value(content);
        c.text_len = json_string_length(content);
    }
    if (c.role || c.text) {
        if (json_array_size(calls) == 0)
            c.finish = finish; /* the common case: one chunk per choice */
        if ((err = emit(st, &c)) != PQ_OK)
            return err;
        sent = 1;
    }
    json_array_foreach(calls, i, tc)
    {
        json_t *fn = json_object_get(tc, "function"), *args = json_object_get(fn, "arguments");
        int ti = index_of(json_object_get(tc, "index"), i, PQ_STREAM_MAX_TOOLS);
        if (!json_is_object(tc) || ti < 0 || (args && !json_is_string(args) && !json_is_null(args)))
            return fail(st, PQ_ERR_MALFORMED, "bad tool call delta");
        chunk_init(st, &c, PQ_STREAM_CHUNK_DELTA);
        c.index = index;
        c.tool = 1;
        c.tool_index = ti;
        c.tool_id = json_string_value(json_object_get(tc, "id"));
        c.tool_name = json_string_value(json_object_get(fn, "name"));
        c.tool_args = json_string_value(args);
        c.tool_args_len = json_string_length(args);
        if (i + 1 == json_array_size(calls))
            c.finish = finish;
        if ((err = emit(st, &c)) != PQ_OK)
            return err;
        sent = 1;
    }
    if (!sent && finish) {
        chunk_init(st, &c, PQ_STREAM_CHUNK_DELTA);
        c.index = index;
        c.finish = finish;
        return emit(st, &c);
    }
    return PQ_OK;
}

static pq_err_t openai_event(pq_stream_t *st, const json_t *root)
{
    json_t *error = json_object_get(root, "error"), *errors = json_object_get(root, "errors");
    json_t *choices = json_object_get(root, "choices"), *usage = json_object_get(root, "usage");
    json_t *created = json_object_get(root, "created"), *ch;
    size_t i;
    pq_err_t err;

    if (json_is_object(error))
        return emit_error(st, json_object_get(error, "code"), json_object_get(error, "type"),
                          json_object_get(error, "message"), 0);
    if (json_is_array(errors)) { /* watsonx */
        json_t *e0 = json_array_get(errors, 0);
        return emit_error(st, json_object_get(e0, "code"), NULL, json_object_get(e0, "message"),
                          json_integer_value(json_object_get(root, "status_code")));
    }
    if ((err = keep_str(&st->id, json_object_get(root, "id"))) != PQ_OK ||
        (err = keep_str(&st->model, json_object_get(root, "model"))) != PQ_OK ||
        (err = keep_str(&st->model, json_object_get(root, "model_id"))) != PQ_OK)
        return fail(st, err, "out of memory");
    if (json_is_integer(created) && json_integer_value(created) > 0)
        st->created = (int64_t)json_integer_value(created);
    if (choices && !json_is_array(choices) && !json_is_null(choices))
        return fail(st, PQ_ERR_MALFORMED, "choices is not an array");
    json_array_foreach(choices, i, ch)
    {
        if ((err = openai_choice(st, ch, i)) != PQ_OK)
            return err;
    }
    if (json_is_object(usage))
        return emit_usage(st, usage_int(usage, "prompt_tokens"),
                          usage_int(usage, "completion_tokens"), usage_int(usage, "total_tokens"));
    return PQ_OK;
}

/* ---- Anthropic ---- */

static pq_err_t anthropic_block_start(pq_stream_t *st, const json_t *root)
{
    json_t *block = json_object_get(root, "content_block");
    const char *type = json_string_value(json_object_get(block, "type"));
    int bi = index_of(json_object_get(root, "index"), 0, MAX_BLOCKS);
    pq_stream_chunk_t c;
    json_t *text, *input;
    char *args = NULL;
    pq_err_t err;

    if (bi < 0 || !type)
        return fail(st, PQ_ERR_MALFORMED, "bad content_block_start");
    chunk_init(st, &c, PQ_STREAM_CHUNK_DELTA);
    if (strcmp(type, "text") == 0) {
        text = json_object_get(block, "text");
        if (json_string_length(text) == 0)
            return PQ_OK;
        c.text = json_string_value(text);
        c.text_len = json_string_length(text);
        return emit(st, &c);
    }
    if (strcmp(type, "tool_use") != 0)
        return PQ_OK; /* thinking, server tools, ...: not part of the OpenAI answer */
    if (st->ntools >= PQ_STREAM_MAX_TOOLS)
        return fail(st, PQ_ERR_MALFORMED, "too many tool calls");
    if (!json_is_string(json_object_get(block, "id")) ||
        !json_is_string(json_object_get(block, "name")))
        return fail(st, PQ_ERR_MALFORMED, "tool_use without id or name");
    st->block_tool[bi] = st->ntools++;
    c.tool = 1;
    c.tool_index = st->block_tool[bi];
    c.tool_id = json_string_value(json_object_get(block, "id"));
    c.tool_name = json_string_value(json_object_get(block, "name"));
    input = json_object_get(block, "input");
    if (json_object_size(input) > 0) { /* normally {} with the input in input_json_delta */
        if (!(args = json_dumps(input, JSON_COMPACT)))
            return fail(st, PQ_ERR_NOMEM, "out of memory");
        c.tool_args = args;
        c.tool_args_len = strlen(args);
    }
    err = emit(st, &c);
    free(args);
    return err;
}

static pq_err_t anthropic_block_delta(pq_stream_t *st, const json_t *root)
{
    json_t *delta = json_object_get(root, "delta"), *v;
    const char *type = json_string_value(json_object_get(delta, "type"));
    int bi = index_of(json_object_get(root, "index"), 0, MAX_BLOCKS);
    pq_stream_chunk_t c;

    if (bi < 0 || !type)
        return fail(st, PQ_ERR_MALFORMED, "bad content_block_delta");
    chunk_init(st, &c, PQ_STREAM_CHUNK_DELTA);
    if (strcmp(type, "text_delta") == 0) {
        v = json_object_get(delta, "text");
        if (!json_is_string(v))
            return fail(st, PQ_ERR_MALFORMED, "text_delta without text");
        if (json_string_length(v) == 0)
            return PQ_OK;
        c.text = json_string_value(v);
        c.text_len = json_string_length(v);
        return emit(st, &c);
    }
    if (strcmp(type, "input_json_delta") == 0) {
        v = json_object_get(delta, "partial_json");
        if (st->block_tool[bi] < 0 || !json_is_string(v))
            return fail(st, PQ_ERR_MALFORMED, "input_json_delta outside a tool_use block");
        if (json_string_length(v) == 0)
            return PQ_OK;
        c.tool = 1;
        c.tool_index = st->block_tool[bi];
        c.tool_args = json_string_value(v);
        c.tool_args_len = json_string_length(v);
        return emit(st, &c);
    }
    return PQ_OK; /* thinking_delta, signature_delta, citations_delta */
}

static pq_err_t anthropic_event(pq_stream_t *st, const json_t *root)
{
    const char *type = json_string_value(json_object_get(root, "type"));
    pq_stream_chunk_t c;
    json_t *msg, *usage, *e;
    pq_err_t err;

    if (!type)
        return fail(st, PQ_ERR_MALFORMED, "event without a type");
    if (strcmp(type, "message_start") == 0) {
        msg = json_object_get(root, "message");
        usage = json_object_get(msg, "usage");
        if ((err = keep_str(&st->id, json_object_get(msg, "id"))) != PQ_OK ||
            (err = keep_str(&st->model, json_object_get(msg, "model"))) != PQ_OK)
            return fail(st, err, "out of memory");
        st->prompt = usage_int(usage, "input_tokens") +
                     usage_int(usage, "cache_creation_input_tokens") +
                     usage_int(usage, "cache_read_input_tokens");
        st->completion = usage_int(usage, "output_tokens");
        chunk_init(st, &c, PQ_STREAM_CHUNK_DELTA);
        c.role = "assistant";
        if ((err = emit(st, &c)) != PQ_OK)
            return err;
        return emit_usage(st, st->prompt, st->completion, 0);
    }
    if (strcmp(type, "content_block_start") == 0)
        return anthropic_block_start(st, root);
    if (strcmp(type, "content_block_delta") == 0)
        return anthropic_block_delta(st, root);
    if (strcmp(type, "message_delta") == 0) {
        const char *finish = finish_anthropic(
            json_string_value(json_object_get(json_object_get(root, "delta"), "stop_reason")));
        usage = json_object_get(root, "usage");
        if (finish) {
            chunk_init(st, &c, PQ_STREAM_CHUNK_DELTA);
            c.finish = finish;
            if ((err = emit(st, &c)) != PQ_OK)
                return err;
        }
        if (!json_is_object(usage))
            return PQ_OK;
        /* output_tokens is the running total; input may be restated */
        if (usage_int(usage, "input_tokens"))
            st->prompt = usage_int(usage, "input_tokens") +
                         usage_int(usage, "cache_creation_input_tokens") +
                         usage_int(usage, "cache_read_input_tokens");
        st->completion = usage_int(usage, "output_tokens");
        return emit_usage(st, st->prompt, st->completion, 0);
    }
    if (strcmp(type, "message_stop") == 0) {
        chunk_init(st, &c, PQ_STREAM_CHUNK_DONE);
        return emit(st, &c);
    }
    if (strcmp(type, "error") == 0) {
        e = json_object_get(root, "error");
        return emit_error(st, json_object_get(e, "type"), NULL, json_object_get(e, "message"), 0);
    }
    return PQ_OK; /* ping, content_block_stop, and types added later */
}

/* ---- Gemini ---- */

static pq_err_t gemini_candidate(pq_stream_t *st, const json_t *cand, size_t pos)
{
    json_t *parts = json_object_get(json_object_get(cand, "content"), "parts"), *p;
    const char *finish = finish_gemini(json_string_value(json_object_get(cand, "finishReason")));
    int index = index_of(json_object_get(cand, "index"), pos, PQ_STREAM_MAX_CHOICES);
    pq_stream_chunk_t c;
    size_t i, n = 0, len = 0;
    char *text = NULL;
    pq_err_t err;

    if (!json_is_object(cand) || index < 0)
        return fail(st, PQ_ERR_MALFORMED, "bad candidate or candidate index");
    if (parts && !json_is_array(parts))
        return fail(st, PQ_ERR_MALFORMED, "parts is not an array");
    json_array_foreach(parts, i, p)
    {
        json_t *t = json_object_get(p, "text");
        if (!json_is_object(p) || (t && !json_is_string(t)))
            return fail(st, PQ_ERR_MALFORMED, "bad part");
        if (t && !json_is_true(json_object_get(p, "thought")))
            len += json_string_length(t), n++;
    }
    chunk_init(st, &c, PQ_STREAM_CHUNK_DELTA);
    c.index = index;
    if (!(st->roles_sent & (1u << index))) {
        st->roles_sent |= 1u << index;
        c.role = "assistant";
    }
    if (len > 0) {
        size_t off = 0;
        if (!(text = malloc(len + 1)))
            return fail(st, PQ_ERR_NOMEM, "out of memory");
        json_array_foreach(parts, i, p)
        {
            json_t *t = json_object_get(p, "text");
            if (t && !json_is_true(json_object_get(p, "thought"))) {
                memcpy(text + off, json_string_value(t), json_string_length(t));
                off += json_string_length(t);
            }
        }
        text[len] = '\0';
        c.text = text;
        c.text_len = len;
    }
    c.finish = finish;
    err = c.role || c.text || c.finish ? emit(st, &c) : PQ_OK;
    free(text);
    return err;
}

static pq_err_t gemini_event(pq_stream_t *st, const json_t *root)
{
    json_t *error = json_object_get(root, "error"), *pf = json_object_get(root, "promptFeedback");
    json_t *cands = json_object_get(root, "candidates"), *usage, *cand, *block;
    size_t i;
    pq_err_t err;

    if (json_is_object(error))
        return emit_error(st, json_object_get(error, "status"), NULL,
                          json_object_get(error, "message"),
                          json_integer_value(json_object_get(error, "code")));
    if ((err = keep_str(&st->id, json_object_get(root, "responseId"))) != PQ_OK ||
        (err = keep_str(&st->model, json_object_get(root, "modelVersion"))) != PQ_OK)
        return fail(st, err, "out of memory");
    if (cands && !json_is_array(cands))
        return fail(st, PQ_ERR_MALFORMED, "candidates is not an array");
    json_array_foreach(cands, i, cand)
    {
        if ((err = gemini_candidate(st, cand, i)) != PQ_OK)
            return err;
    }
    usage = json_object_get(root, "usageMetadata");
    if (json_is_object(usage) && (err = emit_usage(st, usage_int(usage, "promptTokenCount"),
                                                   usage_int(usage, "candidatesTokenCount") +
                                                       usage_int(usage, "thoughtsTokenCount"),
                                                   usage_int(usage, "totalTokenCount"))) != PQ_OK)
        return err;
    block = json_object_get(pf, "blockReason");
    if (json_is_string(block) && strcmp(json_string_value(block), "BLOCK_REASON_UNSPECIFIED")) {
        pq_stream_chunk_t c;
        char word[64];
        safe_word(block, word, sizeof(word));
        chunk_init(st, &c, PQ_STREAM_CHUNK_ERROR);
        c.error = PQ_ERR_CONTENT_FILTER;
        c.error_code = word;
        c.error_text = json_is_string(json_object_get(pf, "blockReasonMessage"))
                           ? json_string_value(json_object_get(pf, "blockReasonMessage"))
                           : "";
        return emit(st, &c);
    }
    return PQ_OK;
}

/* ---- events ---- */

static pq_err_t decode_event(pq_stream_t *st, const pq_sse_event_t *ev)
{
    json_error_t jerr;
    json_t *root;
    pq_err_t err;

    st->event_no = ev->seq;
    if (st->format == PQ_STREAM_OPENAI || st->format == PQ_STREAM_WATSONX) {
        if (ev->data_len == 6 && memcmp(ev->data, "[DONE]", 6) == 0) {
            pq_stream_chunk_t c;
            chunk_init(st, &c, PQ_STREAM_CHUNK_DONE);
            return emit(st, &c);
        }
    }
    if (ev->data_len == 0 || strcmp(ev->type, "ping") == 0)
        return PQ_OK;
    root = json_loadb(ev->data, ev->data_len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (!json_is_object(root)) {
        json_decref(root);
        return fail(st, PQ_ERR_MALFORMED, "not a JSON object");
    }
    switch (st->format) {
    case PQ_STREAM_ANTHROPIC:
        err = anthropic_event(st, root);
        break;
    case PQ_STREAM_GEMINI:
        err = gemini_event(st, root);
        break;
    default:
        err = openai_event(st, root);
        break;
    }
    json_decref(root);
    return err;
}

/* One event; with skip_malformed, a malformed event that gave no chunk is dropped (one that
 * gave some still fails: part of it went out). */
static pq_err_t on_event(const pq_sse_event_t *ev, void *opaque)
{
    pq_stream_t *st = opaque;
    uint64_t before = st->emitted;
    pq_err_t err = decode_event(st, ev);

    if (err == PQ_ERR_MALFORMED && st->skip_malformed && st->emitted == before) {
        st->skipped++;
        st->errstr[0] = '\0';
        return PQ_OK;
    }
    return err;
}

void pq_stream_skip_malformed(pq_stream_t *st, int on)
{
    st->skip_malformed = on != 0;
}

uint64_t pq_stream_skipped(const pq_stream_t *st)
{
    return st->skipped;
}

pq_err_t pq_stream_feed(pq_stream_t *st, const char *buf, size_t len, pq_stream_chunk_cb cb,
                        void *opaque)
{
    pq_err_t err;

    st->cb = cb;
    st->opaque = opaque;
    err = pq_sse_feed(st->sse, buf, len, on_event, st);
    if (err == PQ_ERR_TOO_LARGE && !st->errstr[0])
        snprintf(st->errstr, sizeof(st->errstr), "event %llu: over the size cap",
                 (unsigned long long)pq_sse_count(st->sse) + 1);
    else if (err == PQ_ERR_NOMEM && !st->errstr[0])
        snprintf(st->errstr, sizeof(st->errstr), "out of memory");
    st->cb = NULL;
    st->opaque = NULL;
    return err;
}
