/* The assembler of one attempt's chunks, and the relay rendering of a chunk; see stream.h. */
#include "stream.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    char *p;
    size_t len, size;
} sbuf_t;

typedef struct {
    int seen;
    char *id, *name;
    sbuf_t args;
} tool_t;

typedef struct {
    int seen;
    char role[24];
    sbuf_t text;
    const char *finish; /* static string */
    tool_t tools[PQ_STREAM_MAX_TOOLS];
    int ntools; /* highest tool index seen + 1 */
} choice_t;

struct pq_stream_asm_s {
    size_t max, bytes;
    char *id, *model;
    int64_t created;
    int has_usage;
    int64_t prompt, completion, total;
    int done;
    pq_err_t error; /* provider error event */
    char *error_code, *error_text;
    pq_err_t failed; /* sticky refusal (too large) */
    choice_t choices[PQ_STREAM_MAX_CHOICES];
};

static int sbuf_add(sbuf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->size) {
        size_t size = b->size ? b->size : 64;
        char *p;
        while (size < b->len + n + 1)
            size *= 2;
        if (!(p = realloc(b->p, size)))
            return -1;
        b->p = p;
        b->size = size;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

pq_stream_asm_t *pq_stream_asm_new(size_t max_bytes)
{
    pq_stream_asm_t *a = calloc(1, sizeof(*a));

    if (a)
        a->max = max_bytes;
    return a;
}

void pq_stream_asm_destroy(pq_stream_asm_t *a)
{
    if (!a)
        return;
    for (int i = 0; i < PQ_STREAM_MAX_CHOICES; i++) {
        choice_t *c = &a->choices[i];
        free(c->text.p);
        for (int t = 0; t < PQ_STREAM_MAX_TOOLS; t++) {
            free(c->tools[t].id);
            free(c->tools[t].name);
            free(c->tools[t].args.p);
        }
    }
    free(a->id);
    free(a->model);
    free(a->error_code);
    free(a->error_text);
    free(a);
}

/* Counts n more bytes against the cap. */
static pq_err_t charge(pq_stream_asm_t *a, size_t n)
{
    if (a->max && (n > a->max || a->bytes > a->max - n))
        return PQ_ERR_TOO_LARGE;
    a->bytes += n;
    return PQ_OK;
}

/* Replaces *slot with a copy of s (when s is non-empty and differs). */
static pq_err_t set_str(pq_stream_asm_t *a, char **slot, const char *s, int counted)
{
    size_t n;
    char *copy;

    if (!s || !*s || (*slot && strcmp(*slot, s) == 0))
        return PQ_OK;
    n = strlen(s);
    if (counted && charge(a, n) != PQ_OK)
        return PQ_ERR_TOO_LARGE;
    if (!(copy = strdup(s)))
        return PQ_ERR_NOMEM;
    free(*slot);
    *slot = copy;
    return PQ_OK;
}

static pq_err_t add_delta(pq_stream_asm_t *a, const pq_stream_chunk_t *ch)
{
    choice_t *c;
    pq_err_t err;

    if (ch->index < 0 || ch->index >= PQ_STREAM_MAX_CHOICES)
        return PQ_ERR_MALFORMED;
    c = &a->choices[ch->index];
    c->seen = 1;
    if (ch->role && *ch->role && strlen(ch->role) < sizeof(c->role))
        strcpy(c->role, ch->role);
    if (ch->text && ch->text_len) {
        if ((err = charge(a, ch->text_len)) != PQ_OK)
            return err;
        if (sbuf_add(&c->text, ch->text, ch->text_len))
            return PQ_ERR_NOMEM;
    }
    if (ch->tool) {
        tool_t *t;
        if (ch->tool_index < 0 || ch->tool_index >= PQ_STREAM_MAX_TOOLS)
            return PQ_ERR_MALFORMED;
        t = &c->tools[ch->tool_index];
        t->seen = 1;
        if (ch->tool_index >= c->ntools)
            c->ntools = ch->tool_index + 1;
        if ((err = set_str(a, &t->id, ch->tool_id, 1)) != PQ_OK ||
            (err = set_str(a, &t->name, ch->tool_name, 1)) != PQ_OK)
            return err;
        if (ch->tool_args && ch->tool_args_len) {
            if ((err = charge(a, ch->tool_args_len)) != PQ_OK)
                return err;
            if (sbuf_add(&t->args, ch->tool_args, ch->tool_args_len))
                return PQ_ERR_NOMEM;
        }
    }
    if (ch->finish)
        c->finish = ch->finish;
    return PQ_OK;
}

pq_err_t pq_stream_asm_add(pq_stream_asm_t *a, const pq_stream_chunk_t *ch)
{
    pq_err_t err = PQ_OK;

    if (a->failed)
        return a->failed;
    if ((err = set_str(a, &a->id, ch->id, 0)) != PQ_OK ||
        (err = set_str(a, &a->model, ch->model, 0)) != PQ_OK)
        goto out;
    if (ch->created > 0)
        a->created = ch->created;
    switch (ch->kind) {
    case PQ_STREAM_CHUNK_DELTA:
        err = add_delta(a, ch);
        break;
    case PQ_STREAM_CHUNK_USAGE:
        a->has_usage = 1;
        a->prompt = ch->prompt_tokens;
        a->completion = ch->completion_tokens;
        a->total = ch->total_tokens;
        break;
    case PQ_STREAM_CHUNK_ERROR:
        if (a->error)
            break; /* the first error is the one that counts */
        a->error = ch->error ? ch->error : PQ_ERR_SERVER;
        if ((err = set_str(a, &a->error_code, ch->error_code, 0)) == PQ_OK)
            err = set_str(a, &a->error_text, ch->error_text, 0);
        break;
    case PQ_STREAM_CHUNK_DONE:
        a->done = 1;
        break;
    }
out:
    if (err == PQ_ERR_TOO_LARGE)
        a->failed = err;
    return err;
}

pq_err_t pq_stream_asm_cb(const pq_stream_chunk_t *chunk, void *opaque)
{
    return pq_stream_asm_add(opaque, chunk);
}

pq_stream_end_t pq_stream_asm_end(const pq_stream_asm_t *a)
{
    int seen = 0;

    if (a->error)
        return PQ_STREAM_END_ERROR;
    if (a->done)
        return PQ_STREAM_END_CLEAN;
    for (int i = 0; i < PQ_STREAM_MAX_CHOICES; i++) {
        if (!a->choices[i].seen)
            continue;
        if (!a->choices[i].finish)
            return PQ_STREAM_END_CUT;
        seen = 1;
    }
    return seen ? PQ_STREAM_END_CLEAN : PQ_STREAM_END_CUT;
}

pq_err_t pq_stream_asm_error(const pq_stream_asm_t *a, const char **code, const char **text)
{
    if (code)
        *code = a->error_code ? a->error_code : "";
    if (text)
        *text = a->error_text ? a->error_text : "";
    return a->error;
}

size_t pq_stream_asm_bytes(const pq_stream_asm_t *a)
{
    return a->bytes;
}

static json_t *tool_calls_json(const choice_t *c)
{
    json_t *arr = json_array();

    for (int t = 0; arr && t < c->ntools; t++) {
        const tool_t *tl = &c->tools[t];
        json_t *call;
        if (!tl->seen)
            continue;
        call = json_pack("{s:s, s:s, s:{s:s, s:s%}}", "id", tl->id ? tl->id : "", "type",
                         "function", "function", "name", tl->name ? tl->name : "", "arguments",
                         tl->args.len ? tl->args.p : "{}", tl->args.len ? tl->args.len : (size_t)2);
        if (!call || json_array_append_new(arr, call)) {
            json_decref(arr);
            return NULL;
        }
    }
    return arr;
}

static json_t *choice_json(const choice_t *c, int index)
{
    json_t *msg, *content, *calls = NULL;

    if (c->ntools && !(calls = tool_calls_json(c)))
        return NULL;
    if (c->text.len == 0 && calls)
        content = json_null();
    else
        content = json_stringn(c->text.p ? c->text.p : "", c->text.len);
    msg = json_pack("{s:s, s:o}", "role", c->role[0] ? c->role : "assistant", "content", content);
    if (!msg || (calls && json_object_set_new(msg, "tool_calls", calls))) {
        json_decref(msg);
        json_decref(calls);
        return NULL;
    }
    return json_pack("{s:i, s:o, s:s, s:n}", "index", index, "message", msg, "finish_reason",
                     c->finish ? c->finish : "stop", "logprobs");
}

json_t *pq_stream_asm_completion(const pq_stream_asm_t *a, const char *model, int64_t created)
{
    json_t *choices = json_array(), *doc;
    int64_t total;

    if (!choices)
        return NULL;
    for (int i = 0; i < PQ_STREAM_MAX_CHOICES; i++) {
        json_t *c;
        if (!a->choices[i].seen)
            continue;
        if (!(c = choice_json(&a->choices[i], i)) || json_array_append_new(choices, c)) {
            json_decref(choices);
            return NULL;
        }
    }
    total = a->total ? a->total : a->prompt + a->completion;
    doc = json_pack("{s:s, s:s, s:I, s:s, s:o, s:{s:I, s:I, s:I}}", "id",
                    a->id ? a->id : "chatcmpl-stream", "object", "chat.completion", "created",
                    (json_int_t)(a->created ? a->created : created), "model",
                    a->model ? a->model : (model ? model : ""), "choices", choices, "usage",
                    "prompt_tokens", (json_int_t)a->prompt, "completion_tokens",
                    (json_int_t)a->completion, "total_tokens", (json_int_t)total);
    return doc;
}

/* ---- relay ---- */

static json_t *delta_json(const pq_stream_chunk_t *ch)
{
    json_t *delta = json_object();

    if (!delta)
        return NULL;
    if (ch->role && json_object_set_new(delta, "role", json_string(ch->role)))
        goto out_fail;
    if (ch->text && json_object_set_new(delta, "content", json_stringn(ch->text, ch->text_len)))
        goto out_fail;
    if (ch->tool) {
        json_t *fn = json_object(), *call;
        if (!fn)
            goto out_fail;
        if (ch->tool_name)
            json_object_set_new(fn, "name", json_string(ch->tool_name));
        json_object_set_new(fn, "arguments",
                            json_stringn(ch->tool_args ? ch->tool_args : "", ch->tool_args_len));
        call = json_pack("{s:i, s:o}", "index", ch->tool_index, "function", fn);
        if (!call)
            goto out_fail;
        if (ch->tool_id) {
            json_object_set_new(call, "id", json_string(ch->tool_id));
            json_object_set_new(call, "type", json_string("function"));
        }
        if (json_object_set_new(delta, "tool_calls", json_pack("[o]", call)))
            goto out_fail;
    }
    return delta;
out_fail:
    json_decref(delta);
    return NULL;
}

char *pq_stream_chunk_render(const pq_stream_chunk_t *ch, const char *model, int64_t created,
                             const char *error_message, size_t *len)
{
    json_t *doc = NULL, *choices = NULL, *delta;
    char *out = NULL;

    switch (ch->kind) {
    case PQ_STREAM_CHUNK_DONE:
        out = strdup("[DONE]");
        goto out;
    case PQ_STREAM_CHUNK_ERROR:
        doc = json_pack("{s:{s:s, s:s}}", "error", "type", pq_err_name(ch->error), "code",
                        ch->error_code ? ch->error_code : "");
        if (doc && error_message)
            json_object_set_new(json_object_get(doc, "error"), "message",
                                json_string(error_message));
        goto out_dump;
    case PQ_STREAM_CHUNK_USAGE:
        choices = json_array();
        break;
    case PQ_STREAM_CHUNK_DELTA:
        if (!(delta = delta_json(ch)))
            goto out;
        choices =
            json_pack("[{s:i, s:o, s:n, s:o}]", "index", ch->index, "delta", delta, "logprobs",
                      "finish_reason", ch->finish ? json_string(ch->finish) : json_null());
        break;
    }
    if (!choices)
        goto out;
    doc = json_pack("{s:s, s:s, s:I, s:s, s:o}", "id", ch->id ? ch->id : "chatcmpl-stream",
                    "object", "chat.completion.chunk", "created",
                    (json_int_t)(ch->created ? ch->created : created), "model",
                    ch->model ? ch->model : (model ? model : ""), "choices", choices);
    if (doc && ch->kind == PQ_STREAM_CHUNK_USAGE)
        json_object_set_new(doc, "usage",
                            json_pack("{s:I, s:I, s:I}", "prompt_tokens",
                                      (json_int_t)ch->prompt_tokens, "completion_tokens",
                                      (json_int_t)ch->completion_tokens, "total_tokens",
                                      (json_int_t)ch->total_tokens));
out_dump:
    if (doc)
        out = json_dumps(doc, JSON_COMPACT);
out:
    json_decref(doc);
    if (out && len)
        *len = strlen(out);
    return out;
}
