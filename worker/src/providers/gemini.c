/* Google Gemini API, generateContent
 * (https://ai.google.dev/api/generate-content#method:-models.generatecontent).
 *
 * POST {base_url}/v1beta/models/{model}:generateContent with x-goog-api-key (base_url may
 * already end in /v1beta or /v1; the target model may carry a "models/" prefix).
 *
 * Request mapping from OpenAI chat completions:
 *   - system and developer messages -> systemInstruction {parts:[{text}]} (one part each);
 *   - user -> role "user", assistant -> role "model"; consecutive messages of the same role are
 *     merged into one Content (parts concatenated) so turns alternate;
 *   - text parts -> {text}; data: URL images -> {inlineData {mimeType, data}};
 *   - generationConfig: temperature, top_p -> topP, top_k -> topK, max_completion_tokens or
 *     max_tokens -> maxOutputTokens, stop -> stopSequences, n -> candidateCount, seed,
 *     presence_penalty, frequency_penalty, response_format json_object -> responseMimeType
 *     application/json, json_schema -> that and responseJsonSchema (the schema as given: the
 *     field takes JSON Schema, unlike responseSchema's OpenAPI subset);
 *   - tools (functions) -> tools [{functionDeclarations [{name, description, parameters}]}];
 *     tool_choice auto / none / required -> toolConfig.functionCallingConfig.mode AUTO / NONE /
 *     ANY, a named function -> ANY with allowedFunctionNames; assistant tool_calls -> model
 *     parts {functionCall {name, args}}; tool messages -> user parts {functionResponse {name,
 *     response}} (the name found from tool_call_id among the earlier tool_calls; content that is
 *     a JSON object is the response, other content {"content": text});
 *   - image URLs that are not data: URLs, logprobs, logit_bias, audio, the legacy functions /
 *     function_call, and tools in a streamed call (the stream decoder reads text only) are
 *     PQ_ERR_UNSUPPORTED (the target is skipped);
 *   - stream, stream_options, user, store, metadata, service_tier and unknown fields are dropped.
 *
 * Answer mapping: each candidate -> a choice (index from the candidate or its position), text
 * parts joined (thought parts skipped; a MAX_TOKENS candidate without parts has content ""),
 * functionCall parts -> message.tool_calls (id: the part's id, else "call_<choice>_<n>"; content
 * null when there is no text; finish_reason tool_calls unless the candidate stopped otherwise),
 * finishReason STOP -> stop, MAX_TOKENS -> length, SAFETY, RECITATION, BLOCKLIST,
 * PROHIBITED_CONTENT, SPII, IMAGE_SAFETY -> content_filter, others -> stop; usageMetadata
 * promptTokenCount / candidatesTokenCount (+ thoughtsTokenCount) / totalTokenCount -> usage. A
 * prompt blocked by promptFeedback.blockReason, and an answer whose every candidate was blocked by
 * a content policy (SAFETY, PROHIBITED_CONTENT, BLOCKLIST, SPII) without content, are
 * PQ_ERR_CONTENT_FILTER (fault code: the block or finish reason; reason: blockReasonMessage /
 * finishMessage when given). Errors {"error":{"code","message","status"}}: 400 with reason
 * API_KEY_INVALID is an authentication error (Gemini answers a bad key with 400); status
 * RESOURCE_EXHAUSTED is rate_limited, UNAVAILABLE server_error, FAILED_PRECONDITION (e.g. no free
 * tier in the caller's region) refused; INVALID_ARGUMENT whose message says the input token count
 * exceeds the maximum is context_length. The fault's code is error.status; its reason the sanitised
 * message for context_length, refused and not_found. */
#include "provider.h"
#include "common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* ---- request ---- */

static pq_err_t unsupported(const char *what, size_t mi, char *errstr, size_t errstr_size)
{
    if (mi == (size_t)-1)
        snprintf(errstr, errstr_size, "gemini cannot express %s", what);
    else
        snprintf(errstr, errstr_size, "gemini cannot express messages[%zu] (%s)", mi, what);
    return PQ_ERR_UNSUPPORTED;
}

static pq_err_t image_part(const json_t *part, size_t mi, json_t *parts, char *errstr,
                           size_t errstr_size)
{
    json_t *iu = json_object_get(part, "image_url");
    const char *url = json_string_value(json_is_object(iu) ? json_object_get(iu, "url") : iu);
    const char *mt, *data;
    size_t mt_len;

    if (!url) {
        snprintf(errstr, errstr_size, "messages[%zu]: image_url part without a url", mi);
        return PQ_ERR_INVALID;
    }
    if (pq_provider_data_url(url, &mt, &mt_len, &data) != 0)
        return unsupported("image URL that is not a base64 data: URL", mi, errstr, errstr_size);
    return json_array_append_new(parts, json_pack("{s:{s:s%, s:s}}", "inlineData", "mimeType", mt,
                                                  mt_len, "data", data))
               ? PQ_ERR_NOMEM
               : PQ_OK;
}

/* Appends Gemini parts for an OpenAI content value. text_only: images refused. */
static pq_err_t content_parts(const json_t *content, size_t mi, int text_only, json_t *parts,
                              char *errstr, size_t errstr_size)
{
    size_t j;
    json_t *part;

    if (!content || json_is_null(content))
        return PQ_OK;
    if (json_is_string(content)) {
        if (json_string_length(content) == 0)
            return PQ_OK;
        return json_array_append_new(parts, json_pack("{s:O}", "text", content)) ? PQ_ERR_NOMEM
                                                                                 : PQ_OK;
    }
    if (!json_is_array(content)) {
        snprintf(errstr, errstr_size,
                 "messages[%zu].content: expected a string or an array of parts", mi);
        return PQ_ERR_INVALID;
    }
    json_array_foreach(content, j, part)
    {
        const char *type = json_string_value(json_object_get(part, "type"));
        json_t *text = json_object_get(part, "text");
        pq_err_t err;

        if (type && strcmp(type, "text") == 0 && json_is_string(text)) {
            if (json_string_length(text) > 0 &&
                json_array_append_new(parts, json_pack("{s:O}", "text", text)))
                return PQ_ERR_NOMEM;
        } else if (type && strcmp(type, "image_url") == 0 && !text_only) {
            if ((err = image_part(part, mi, parts, errstr, errstr_size)) != PQ_OK)
                return err;
        } else if (!type) {
            snprintf(errstr, errstr_size, "messages[%zu].content[%zu]: part without a type", mi, j);
            return PQ_ERR_INVALID;
        } else {
            return unsupported("content part type", mi, errstr, errstr_size);
        }
    }
    return PQ_OK;
}

/* Appends functionCall parts for an assistant message's tool_calls; records id -> name. */
static pq_err_t call_parts(const json_t *calls, size_t mi, json_t *parts, json_t *names,
                           char *errstr, size_t errstr_size)
{
    size_t j;
    json_t *call;

    if (!calls || json_is_null(calls))
        return PQ_OK;
    if (!json_is_array(calls)) {
        snprintf(errstr, errstr_size, "messages[%zu].tool_calls: expected an array", mi);
        return PQ_ERR_INVALID;
    }
    json_array_foreach(calls, j, call)
    {
        const json_t *id, *name;
        json_t *args;
        pq_err_t err =
            pq_provider_tool_call(call, mi, j, "gemini", &id, &name, &args, errstr, errstr_size);
        if (err != PQ_OK)
            return err;
        if (json_array_append_new(
                parts, json_pack("{s:{s:O, s:o}}", "functionCall", "name", name, "args", args)) ||
            json_object_set(names, json_string_value(id), (json_t *)name))
            return PQ_ERR_NOMEM;
    }
    return PQ_OK;
}

/* A tool message as a functionResponse part (the function's name from names). */
static pq_err_t result_part(const json_t *m, size_t mi, const json_t *names, json_t *parts,
                            char *errstr, size_t errstr_size)
{
    const char *id = json_string_value(json_object_get(m, "tool_call_id"));
    json_t *name = id ? json_object_get(names, id) : NULL, *content = json_object_get(m, "content");
    json_t *text = json_array(), *resp = NULL;
    pq_err_t err;

    if (!name) {
        json_decref(text);
        snprintf(errstr, errstr_size,
                 "messages[%zu]: tool_call_id does not name a tool call of an earlier message", mi);
        return PQ_ERR_INVALID;
    }
    if (!text)
        return PQ_ERR_NOMEM;
    /* the text of the content (string or text parts), then as JSON when it is an object */
    if ((err = content_parts(content, mi, 1, text, errstr, errstr_size)) != PQ_OK) {
        json_decref(text);
        return err;
    }
    if (json_array_size(text) == 1) {
        const json_t *t = json_object_get(json_array_get(text, 0), "text");
        resp = json_loadb(json_string_value(t), json_string_length(t), JSON_ALLOW_NUL, NULL);
        if (resp && !json_is_object(resp)) {
            json_decref(resp);
            resp = NULL;
        }
    }
    if (!resp) {
        size_t k, len = 0, off = 0;
        json_t *p;
        char *buf;
        json_array_foreach(text, k, p) len += json_string_length(json_object_get(p, "text"));
        if (!(buf = malloc(len + 1))) {
            json_decref(text);
            return PQ_ERR_NOMEM;
        }
        json_array_foreach(text, k, p)
        {
            const json_t *t = json_object_get(p, "text");
            memcpy(buf + off, json_string_value(t), json_string_length(t));
            off += json_string_length(t);
        }
        resp = json_pack("{s:s%}", "content", buf, off);
        free(buf);
    }
    json_decref(text);
    if (!resp)
        return PQ_ERR_NOMEM;
    return json_array_append_new(parts, json_pack("{s:{s:O, s:o}}", "functionResponse", "name",
                                                  name, "response", resp))
               ? PQ_ERR_NOMEM
               : PQ_OK;
}

static pq_err_t convert_messages(const json_t *msgs, json_t *contents, json_t *sys_parts,
                                 char *errstr, size_t errstr_size)
{
    json_t *m, *names = json_object();
    pq_err_t err = PQ_ERR_NOMEM;
    size_t i;

    if (!names)
        return PQ_ERR_NOMEM;
    if (pq_provider_messages_check(msgs, errstr, errstr_size) != PQ_OK) {
        err = PQ_ERR_INVALID;
        goto out;
    }
    json_array_foreach(msgs, i, m)
    {
        const char *role = pq_provider_message_role(m, i, errstr, errstr_size);
        json_t *content = json_object_get(m, "content"), *parts;
        int tool;

        if (!role) {
            err = PQ_ERR_INVALID;
            goto out;
        }
        if (strcmp(role, "system") == 0 || strcmp(role, "developer") == 0) {
            if ((err = content_parts(content, i, 1, sys_parts, errstr, errstr_size)) != PQ_OK)
                goto out;
            continue;
        }
        if (strcmp(role, "function") == 0) {
            err = unsupported("the legacy function role", i, errstr, errstr_size);
            goto out;
        }
        tool = strcmp(role, "tool") == 0;
        if (!tool && strcmp(role, "user") != 0 && strcmp(role, "assistant") != 0) {
            snprintf(errstr, errstr_size, "messages[%zu]: unknown role", i);
            err = PQ_ERR_INVALID;
            goto out;
        }
        if (pq_provider_field_set(json_object_get(m, "function_call"))) {
            err = unsupported("the legacy function_call", i, errstr, errstr_size);
            goto out;
        }
        if (!(parts = json_array())) {
            err = PQ_ERR_NOMEM;
            goto out;
        }
        if (tool)
            err = result_part(m, i, names, parts, errstr, errstr_size);
        else if ((err = content_parts(content, i, 0, parts, errstr, errstr_size)) == PQ_OK &&
                 strcmp(role, "assistant") == 0)
            err =
                call_parts(json_object_get(m, "tool_calls"), i, parts, names, errstr, errstr_size);
        if (err != PQ_OK) {
            json_decref(parts);
            goto out;
        }
        if ((err = pq_provider_turn_add(contents, strcmp(role, "assistant") == 0 ? "model" : "user",
                                        "parts", parts)))
            goto out;
    }
    err = PQ_OK;
    if (json_array_size(contents) == 0) {
        snprintf(errstr, errstr_size, "messages: no user or assistant content");
        err = PQ_ERR_INVALID;
    }
out:
    json_decref(names);
    return err;
}

/* tools -> functionDeclarations, tool_choice -> toolConfig. */
static pq_err_t map_tools(const json_t *req, json_t *body, char *errstr, size_t errstr_size)
{
    json_t *tools = json_object_get(req, "tools"), *choice = json_object_get(req, "tool_choice");
    json_t *decls, *t, *fcc;
    const char *mode = NULL;
    size_t i;

    if (pq_provider_field_set(tools)) {
        if (!json_is_array(tools)) {
            snprintf(errstr, errstr_size, "tools: expected an array");
            return PQ_ERR_INVALID;
        }
        if (!(decls = json_array()) ||
            json_object_set_new(body, "tools", json_pack("[{s:o}]", "functionDeclarations", decls)))
            return PQ_ERR_NOMEM;
        json_array_foreach(tools, i, t)
        {
            const json_t *name, *desc, *params;
            pq_err_t err =
                pq_provider_tool_def(t, i, "gemini", &name, &desc, &params, errstr, errstr_size);
            json_t *d;

            if (err != PQ_OK)
                return err;
            if (!(d = json_pack("{s:O}", "name", name)) || json_array_append_new(decls, d) ||
                (desc && json_object_set(d, "description", (json_t *)desc)) ||
                (params && json_object_set(d, "parameters", (json_t *)params)))
                return PQ_ERR_NOMEM;
        }
    }
    if (json_is_string(choice)) {
        const char *c = json_string_value(choice);
        mode = strcmp(c, "auto") == 0       ? "AUTO"
               : strcmp(c, "none") == 0     ? "NONE"
               : strcmp(c, "required") == 0 ? "ANY"
                                            : NULL;
        if (!mode) {
            snprintf(errstr, errstr_size, "tool_choice: unknown value");
            return PQ_ERR_INVALID;
        }
        fcc = json_pack("{s:s}", "mode", mode);
    } else if (json_is_object(choice)) {
        json_t *name = json_object_get(json_object_get(choice, "function"), "name");
        if (!json_is_string(name)) {
            snprintf(errstr, errstr_size, "gemini cannot express this tool_choice");
            return PQ_ERR_UNSUPPORTED;
        }
        fcc = json_pack("{s:s, s:[O]}", "mode", "ANY", "allowedFunctionNames", name);
    } else {
        return PQ_OK;
    }
    return !fcc || json_object_set_new(body, "toolConfig",
                                       json_pack("{s:o}", "functionCallingConfig", fcc))
               ? PQ_ERR_NOMEM
               : PQ_OK;
}

static const char *const unsupported_fields[] = {
    "functions", "function_call",      "logprobs",   "top_logprobs", "logit_bias",
    "audio",     "web_search_options", "prediction", NULL,
};

static pq_err_t generation_config(const json_t *req, json_t *gc, char *errstr, size_t errstr_size)
{
    static const struct {
        const char *from, *to;
        int integer;
    } pass[] = {
        {"temperature", "temperature", 0},
        {"top_p", "topP", 0},
        {"top_k", "topK", 1},
        {"seed", "seed", 1},
        {"presence_penalty", "presencePenalty", 0},
        {"frequency_penalty", "frequencyPenalty", 0},
    };
    json_t *v, *rf;
    pq_err_t err;

    for (size_t i = 0; i < sizeof(pass) / sizeof(pass[0]); i++) {
        v = json_object_get(req, pass[i].from);
        if (!v || json_is_null(v))
            continue;
        if (pass[i].integer ? !json_is_integer(v) : !json_is_number(v)) {
            snprintf(errstr, errstr_size, "%s: expected a number", pass[i].from);
            return PQ_ERR_INVALID;
        }
        if (json_object_set(gc, pass[i].to, v))
            return PQ_ERR_NOMEM;
    }
    if ((err = pq_provider_max_tokens(req, &v, errstr, errstr_size)) != PQ_OK)
        return err;
    if (v && json_object_set(gc, "maxOutputTokens", v))
        return PQ_ERR_NOMEM;
    if ((err = pq_provider_stop_set(req, gc, "stopSequences", 1, errstr, errstr_size)) != PQ_OK)
        return err;
    v = json_object_get(req, "n");
    if (json_is_integer(v) && json_integer_value(v) != 1 &&
        json_object_set(gc, "candidateCount", v))
        return PQ_ERR_NOMEM;
    rf = json_object_get(req, "response_format");
    if (json_is_object(rf)) {
        const char *t = json_string_value(json_object_get(rf, "type"));
        if (t && strcmp(t, "json_object") == 0) {
            if (json_object_set_new(gc, "responseMimeType", json_string("application/json")))
                return PQ_ERR_NOMEM;
        } else if (t && strcmp(t, "json_schema") == 0) {
            json_t *schema = json_object_get(json_object_get(rf, "json_schema"), "schema");
            if (!json_is_object(schema)) {
                snprintf(errstr, errstr_size,
                         "response_format.json_schema.schema: expected an "
                         "object");
                return PQ_ERR_INVALID;
            }
            if (json_object_set_new(gc, "responseMimeType", json_string("application/json")) ||
                json_object_set(gc, "responseJsonSchema", schema))
                return PQ_ERR_NOMEM;
        } else if (t && strcmp(t, "text") != 0) {
            return unsupported("response_format", (size_t)-1, errstr, errstr_size);
        }
    }
    v = json_object_get(req, "modalities");
    for (size_t i = 0; i < json_array_size(v); i++) {
        const char *s = json_string_value(json_array_get(v, i));
        if (!s || strcmp(s, "text") != 0)
            return unsupported("modalities", (size_t)-1, errstr, errstr_size);
    }
    return PQ_OK;
}

static pq_err_t build_body(const json_t *req, json_t *body, int stream, char *errstr,
                           size_t errstr_size)
{
    json_t *contents = json_array(), *sys = json_array(), *gc = json_object();
    pq_err_t err = PQ_ERR_NOMEM;

    if (!contents || !sys || !gc)
        goto out;
    for (size_t i = 0; unsupported_fields[i]; i++)
        if (pq_provider_field_set(json_object_get(req, unsupported_fields[i]))) {
            err = unsupported(unsupported_fields[i], (size_t)-1, errstr, errstr_size);
            goto out;
        }
    if (stream && pq_provider_field_set(json_object_get(req, "tools"))) {
        err = unsupported("tools in a streamed call", (size_t)-1, errstr, errstr_size);
        goto out;
    }
    if ((err = convert_messages(json_object_get(req, "messages"), contents, sys, errstr,
                                errstr_size)) != PQ_OK)
        goto out;
    if ((err = map_tools(req, body, errstr, errstr_size)) != PQ_OK)
        goto out;
    if ((err = generation_config(req, gc, errstr, errstr_size)) != PQ_OK)
        goto out;
    err = PQ_ERR_NOMEM;
    if (json_object_set(body, "contents", contents))
        goto out;
    if (json_array_size(sys) > 0 &&
        json_object_set_new(body, "systemInstruction", json_pack("{s:O}", "parts", sys)))
        goto out;
    if (json_object_size(gc) > 0 && json_object_set(body, "generationConfig", gc))
        goto out;
    err = PQ_OK;
out:
    if (err == PQ_ERR_NOMEM)
        snprintf(errstr, errstr_size, "out of memory");
    json_decref(contents);
    json_decref(sys);
    json_decref(gc);
    return err;
}

static pq_err_t gemini_build(const pq_target_t *target, const json_t *request, const char *key,
                             pq_provider_req_t *out, char *errstr, size_t errstr_size, int stream)
{
    const pq_provider_conf_t *p = target->p;
    const char *model = target->model, *version = "/v1beta";
    json_t *body = json_object();
    pq_err_t err;
    char *esc = NULL;

    if ((err = pq_provider_req_start(request, out, errstr, errstr_size)) != PQ_OK ||
        (err = pq_provider_key_check(p, key, "api key", errstr, errstr_size)) != PQ_OK)
        goto out;
    if ((err = body ? build_body(request, body, stream, errstr, errstr_size) : PQ_ERR_NOMEM) !=
        PQ_OK)
        goto out;
    err = PQ_ERR_NOMEM;
    if (pq_provider_req_json(out, body))
        goto out;
    if (strncmp(model, "models/", 7) == 0)
        model += 7;
    if (ends_with(p->base_url, "/v1beta") || ends_with(p->base_url, "/v1"))
        version = "";
    if (!(esc = pq_provider_escape(model)))
        goto out;
    if (pq_provider_req_url(out, "%s%s/models/%s:%s", p->base_url, version, esc,
                            stream ? "streamGenerateContent?alt=sse" : "generateContent") ||
        (key && *key && pq_provider_header_add(&out->headers, "x-goog-api-key", key)) ||
        pq_provider_headers_add_conf(&out->headers, p, 0, errstr, errstr_size))
        goto out;
    err = PQ_OK;
out:
    free(esc);
    json_decref(body);
    return pq_provider_req_end(out, err, errstr, errstr_size);
}

/* ---- answer ---- */

static const char *finish_reason(const char *r)
{
    static const char *const filtered[] = {
        "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", NULL};
    if (!r)
        return "stop";
    if (strcmp(r, "MAX_TOKENS") == 0)
        return "length";
    for (size_t i = 0; filtered[i]; i++)
        if (strcmp(r, filtered[i]) == 0)
            return "content_filter";
    return "stop"; /* STOP, OTHER, LANGUAGE, MALFORMED_FUNCTION_CALL, ... */
}

/* OpenAI tool_calls for a candidate's functionCall parts (NULL: none; *bad set when one is
 * unreadable). pos: the choice's index, for ids the answer does not give. */
static json_t *tool_calls(const json_t *parts, size_t pos, int *bad)
{
    json_t *calls = NULL, *p;
    size_t i, n = 0;

    json_array_foreach(parts, i, p)
    {
        json_t *fc = json_object_get(p, "functionCall"), *call;
        const json_t *name = json_object_get(fc, "name"), *args = json_object_get(fc, "args");
        const char *id = json_string_value(json_object_get(fc, "id"));
        char gen[48];

        if (!fc)
            continue;
        if (!json_is_string(name) || (args && !json_is_object(args) && !json_is_null(args))) {
            *bad = 1;
            break;
        }
        if (!id || !*id) {
            snprintf(gen, sizeof(gen), "call_%zu_%zu", pos, n);
            id = gen;
        }
        n++;
        call = pq_provider_tool_call_new(id, json_string_value(name),
                                         json_is_object(args) ? args : NULL);
        if (!call || (!calls && !(calls = json_array())) || json_array_append_new(calls, call)) {
            *bad = 1;
            break;
        }
    }
    if (*bad) {
        json_decref(calls);
        return NULL;
    }
    return calls;
}

/* OpenAI choice for one candidate, or NULL when it is unreadable (or no memory). */
static json_t *choice_from_candidate(const json_t *cand, size_t pos)
{
    json_t *parts = json_object_get(json_object_get(cand, "content"), "parts"), *p, *idx;
    const char *fr = json_string_value(json_object_get(cand, "finishReason"));
    const char *mapped = finish_reason(fr);
    json_t *content, *calls = NULL, *choice;
    size_t i, len = 0, off = 0;
    int bad = 0;
    char *text;

    if (!json_is_object(cand))
        return NULL;
    if (!parts && fr && strcmp(fr, "MAX_TOKENS") == 0) {
        /* the limit was reached before any text: thinking models spend a small max_tokens
         * (the health probe's 1) on thoughts and answer no parts */
        content = json_string("");
    } else if (!json_is_array(parts)) {
        /* a filtered candidate carries no content; anything else without content is broken */
        if (strcmp(mapped, "content_filter") != 0)
            return NULL;
        content = json_null();
    } else {
        json_array_foreach(parts, i, p)
        {
            json_t *t = json_object_get(p, "text");
            if (!json_is_object(p) || (t && !json_is_string(t)))
                return NULL;
            if (t && !json_is_true(json_object_get(p, "thought")))
                len += json_string_length(t);
        }
        if ((calls = tool_calls(parts, pos, &bad)) == NULL && bad)
            return NULL;
        if (!(text = malloc(len + 1))) {
            json_decref(calls);
            return NULL;
        }
        json_array_foreach(parts, i, p)
        {
            json_t *t = json_object_get(p, "text");
            if (t && !json_is_true(json_object_get(p, "thought"))) {
                memcpy(text + off, json_string_value(t), json_string_length(t));
                off += json_string_length(t);
            }
        }
        content = (off == 0 && calls) ? json_null() : json_stringn(text, off);
        free(text);
        /* Gemini says STOP after a function call; OpenAI says tool_calls */
        if (calls && strcmp(mapped, "stop") == 0)
            mapped = "tool_calls";
    }
    idx = json_object_get(cand, "index");
    choice =
        json_pack("{s:I, s:{s:s, s:o}, s:s, s:n}", "index",
                  json_is_integer(idx) ? json_integer_value(idx) : (json_int_t)pos, "message",
                  "role", "assistant", "content", content, "finish_reason", mapped, "logprobs");
    if (choice && calls &&
        json_object_set_new(json_object_get(choice, "message"), "tool_calls", calls)) {
        json_decref(choice);
        return NULL;
    }
    if (!choice)
        json_decref(calls);
    return choice;
}

/* 1 when an error body says the API key is invalid (Gemini answers that with HTTP 400). */
static int key_invalid(const json_t *error)
{
    json_t *details = json_object_get(error, "details"), *d;
    size_t i;

    json_array_foreach(details, i, d)
    {
        const char *reason = json_string_value(json_object_get(d, "reason"));
        if (reason && strcmp(reason, "API_KEY_INVALID") == 0)
            return 1;
    }
    return 0;
}

/* Refines err (from the HTTP status) by the error's status and message; sets token (size
 * bytes) to the most specific safe word: "API_KEY_INVALID" for a bad key, else error.status. */
static pq_err_t error_class(pq_err_t err, const json_t *e, char *token, size_t size)
{
    json_t *msg = json_object_get(e, "message");

    pq_provider_safe_token(json_object_get(e, "status"), token, size);
    if (err == PQ_ERR_REFUSED && key_invalid(e)) {
        snprintf(token, size, "API_KEY_INVALID");
        return PQ_ERR_AUTH;
    }
    if (strcmp(token, "RESOURCE_EXHAUSTED") == 0)
        return PQ_ERR_RATE_LIMITED;
    if (strcmp(token, "UNAVAILABLE") == 0)
        return PQ_ERR_SERVER;
    if (strcmp(token, "FAILED_PRECONDITION") == 0)
        return PQ_ERR_REFUSED; /* e.g. no free tier in the caller's region: another may serve */
    /* "The input token count (1200293) exceeds the maximum number of tokens allowed (1048576)." */
    if (err == PQ_ERR_REFUSED && strcmp(token, "INVALID_ARGUMENT") == 0 &&
        pq_provider_str_has(msg, "input token count") &&
        pq_provider_str_has(msg, "exceeds the maximum"))
        return PQ_ERR_CONTEXT_LENGTH;
    return err;
}

/* The first candidate when every candidate is blocked by a content policy without content
 * (finishReason SAFETY, PROHIBITED_CONTENT, BLOCKLIST or SPII, no parts), else NULL: the answer
 * is a refusal. A blocked candidate that has parts (or next to one that has) is an answer with
 * finish_reason content_filter. */
static json_t *all_blocked(const json_t *cands)
{
    static const char *const policy[] = {"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", NULL};
    const json_t *c;
    size_t i;

    json_array_foreach(cands, i, c)
    {
        json_t *parts = json_object_get(json_object_get(c, "content"), "parts");
        const char *fr = json_string_value(json_object_get(c, "finishReason"));
        int blocked = 0;
        if (json_array_size(parts) > 0 || !fr)
            return NULL;
        for (size_t k = 0; policy[k]; k++)
            blocked |= strcmp(fr, policy[k]) == 0;
        if (!blocked)
            return NULL;
    }
    return json_array_get(cands, 0);
}

static const char *const usage_names[] = {"promptTokenCount", "candidatesTokenCount",
                                          "thoughtsTokenCount", "totalTokenCount"};

static pq_err_t gemini_parse_response(const pq_target_t *target, long status, const char *body,
                                      size_t len, json_t **completion, int *verbatim,
                                      pq_provider_fault_t *fault, char *errstr, size_t errstr_size)
{
    pq_err_t err = pq_err_from_http_status(status);
    json_t *root = json_loadb(body, len, JSON_ALLOW_NUL, NULL), *cands, *c, *choices = NULL, *id;
    json_t *block, *pf, *v;
    json_int_t pt, ct, tt, counts[4];
    size_t i;

    (void)verbatim; /* a converted answer is never the body */
    *completion = NULL;
    if (err != PQ_OK) {
        char token[80] = "";
        json_t *e = json_object_get(root, "error");
        err = error_class(err, e, token, sizeof(token));
        pq_provider_fault_code(fault, token);
        if (err == PQ_ERR_CONTEXT_LENGTH || err == PQ_ERR_REFUSED || err == PQ_ERR_NOT_FOUND)
            pq_provider_fault_reason(fault, target, json_object_get(e, "message"));
        pq_provider_http_error(errstr, errstr_size, target, status, token);
        goto out;
    }
    cands = json_object_get(root, "candidates");
    pf = json_object_get(root, "promptFeedback");
    block = json_object_get(pf, "blockReason");
    if (json_is_object(root) && json_array_size(cands) == 0 && block) {
        char token[80] = "";
        pq_provider_safe_token(block, token, sizeof(token));
        snprintf(errstr, errstr_size, "%s blocked the prompt%s%s", target->p->name,
                 token[0] ? ": " : "", token);
        pq_provider_fault_code(fault, token);
        pq_provider_fault_reason(fault, target, json_object_get(pf, "blockReasonMessage"));
        err = PQ_ERR_CONTENT_FILTER;
        goto out;
    }
    if (!json_is_array(cands) || json_array_size(cands) == 0) {
        snprintf(errstr, errstr_size, "%s answered HTTP %ld without candidates", target->p->name,
                 status);
        err = PQ_ERR_MALFORMED;
        goto out;
    }
    if ((c = all_blocked(cands))) {
        char token[80] = "";
        pq_provider_safe_token(json_object_get(c, "finishReason"), token, sizeof(token));
        snprintf(errstr, errstr_size, "%s blocked the answer: %s", target->p->name, token);
        pq_provider_fault_code(fault, token);
        pq_provider_fault_reason(fault, target, json_object_get(c, "finishMessage"));
        err = PQ_ERR_CONTENT_FILTER;
        goto out;
    }
    if (!(choices = json_array()))
        goto out_nomem;
    json_array_foreach(cands, i, c)
    {
        json_t *choice = choice_from_candidate(c, i);
        if (!choice) {
            snprintf(errstr, errstr_size, "%s answered a candidate without content",
                     target->p->name);
            err = PQ_ERR_MALFORMED;
            goto out;
        }
        if (json_array_append_new(choices, choice))
            goto out_nomem;
    }
    if ((err = pq_provider_usage_read(target, json_object_get(root, "usageMetadata"), usage_names,
                                      counts, 4, errstr, errstr_size)) != PQ_OK)
        goto out;
    pt = counts[0];
    ct = counts[1] + counts[2];
    tt = counts[3];
    id = json_object_get(root, "responseId");
    v = json_object_get(root, "modelVersion");
    err = pq_provider_completion(
        completion, json_is_string(id) ? json_string_value(id) : "gemini-unknown",
        (json_int_t)time(NULL), json_is_string(v) ? json_string_value(v) : target->model, choices,
        pt, ct, tt, errstr, errstr_size);
    goto out;

out_nomem:
    snprintf(errstr, errstr_size, "out of memory");
    err = PQ_ERR_NOMEM;
out:
    json_decref(choices);
    json_decref(root);
    return err;
}

static pq_err_t gemini_build_request(const pq_target_t *target, const json_t *request,
                                     const char *key, pq_provider_req_t *out, char *errstr,
                                     size_t errstr_size)
{
    return gemini_build(target, request, key, out, errstr, errstr_size, 0);
}

/* The same body to :streamGenerateContent?alt=sse (an SSE stream of GenerateContentResponse). */
static pq_err_t gemini_build_stream_request(const pq_target_t *target, const json_t *request,
                                            const char *key, pq_provider_req_t *out, char *errstr,
                                            size_t errstr_size)
{
    return gemini_build(target, request, key, out, errstr, errstr_size, 1);
}

const pq_provider_ops_t pq_provider_gemini = {
    .type = "gemini",
    .build_request = gemini_build_request,
    .build_stream_request = gemini_build_stream_request,
    .parse_response = gemini_parse_response,
};
