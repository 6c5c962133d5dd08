#include "common.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

pq_err_t pq_provider_req_start(const json_t *request, pq_provider_req_t *out, char *errstr,
                               size_t errstr_size)
{
    memset(out, 0, sizeof(*out));
    if (!json_is_object(request)) {
        snprintf(errstr, errstr_size, "request is not an object");
        return PQ_ERR_INVALID;
    }
    return PQ_OK;
}

pq_err_t pq_provider_key_check(const pq_provider_conf_t *p, const char *key, const char *what,
                               char *errstr, size_t errstr_size)
{
    if (!key || !strpbrk(key, "\r\n"))
        return PQ_OK;
    snprintf(errstr, errstr_size, "providers.%s: %s contains a line break", p->name, what);
    return PQ_ERR_CONFIG;
}

pq_err_t pq_provider_req_end(pq_provider_req_t *out, pq_err_t err, char *errstr, size_t errstr_size)
{
    if (err == PQ_OK)
        return PQ_OK;
    if (err == PQ_ERR_NOMEM)
        snprintf(errstr, errstr_size, "out of memory");
    pq_provider_req_clear(out);
    return err;
}

pq_err_t pq_provider_messages_check(const json_t *msgs, char *errstr, size_t errstr_size)
{
    if (json_is_array(msgs) && json_array_size(msgs) > 0)
        return PQ_OK;
    snprintf(errstr, errstr_size, "messages: a non-empty array is required");
    return PQ_ERR_INVALID;
}

const char *pq_provider_message_role(const json_t *m, size_t i, char *errstr, size_t errstr_size)
{
    const char *role = json_string_value(json_object_get(m, "role"));

    if (!json_is_object(m) || !role) {
        snprintf(errstr, errstr_size, "messages[%zu]: an object with a role is required", i);
        return NULL;
    }
    return role;
}

int pq_provider_req_json(pq_provider_req_t *out, const json_t *body)
{
    if (!(out->body = json_dumps(body, JSON_COMPACT)))
        return -1;
    out->body_len = strlen(out->body);
    return pq_provider_header_add(&out->headers, "Content-Type", "application/json");
}

int pq_provider_stream_fields(json_t *body, int stream)
{
    if (!stream) {
        json_object_del(body, "stream");
        json_object_del(body, "stream_options");
        return 0;
    }
    if (json_object_set_new(body, "stream", json_true()) ||
        json_object_set_new(body, "stream_options", json_pack("{s:b}", "include_usage", 1)))
        return -1;
    return 0;
}

int pq_provider_req_url(pq_provider_req_t *out, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vasprintf(&out->url, fmt, ap);
    va_end(ap);
    if (n < 0) {
        out->url = NULL;
        return -1;
    }
    return 0;
}

int pq_provider_header_add(struct curl_slist **list, const char *name, const char *value)
{
    size_t n = strlen(name), v = strlen(value);
    char *line = malloc(n + v + 3);
    struct curl_slist *l;

    if (!line)
        return -1;
    memcpy(line, name, n);
    line[n] = ':';
    line[n + 1] = ' ';
    memcpy(line + n + 2, value, v + 1);
    l = curl_slist_append(*list, line);
    explicit_bzero(line, n + v + 2); /* may hold a key */
    free(line);
    if (!l)
        return -1;
    *list = l;
    return 0;
}

int pq_provider_header_add_bearer(struct curl_slist **list, const char *token)
{
    static const char prefix[] = "Authorization: Bearer ";
    size_t n = strlen(token);
    char *line = malloc(sizeof(prefix) + n);
    struct curl_slist *l;

    if (!line)
        return -1;
    memcpy(line, prefix, sizeof(prefix) - 1);
    memcpy(line + sizeof(prefix) - 1, token, n + 1);
    l = curl_slist_append(*list, line);
    explicit_bzero(line, sizeof(prefix) - 1 + n); /* holds the key */
    free(line);
    if (!l)
        return -1;
    *list = l;
    return 0;
}

pq_err_t pq_provider_headers_add_conf(struct curl_slist **list, const pq_provider_conf_t *p,
                                      size_t max_line, char *errstr, size_t errstr_size)
{
    for (size_t i = 0; i < p->nheaders; i++) {
        const pq_kv_t *h = &p->headers[i];
        if (max_line && strlen(h->key) + 2 + strlen(h->value) >= max_line) {
            snprintf(errstr, errstr_size, "providers.%s.headers.%s: too long", p->name, h->key);
            return PQ_ERR_CONFIG;
        }
        if (pq_provider_header_add(list, h->key, h->value)) {
            snprintf(errstr, errstr_size, "out of memory");
            return PQ_ERR_NOMEM;
        }
    }
    return PQ_OK;
}

pq_err_t pq_provider_max_tokens(const json_t *req, json_t **v, char *errstr, size_t errstr_size)
{
    json_t *m = json_object_get(req, "max_completion_tokens");

    *v = NULL;
    if (!pq_provider_field_set(m))
        m = json_object_get(req, "max_tokens");
    if (!pq_provider_field_set(m))
        return PQ_OK;
    if (!json_is_integer(m) || json_integer_value(m) < 1) {
        snprintf(errstr, errstr_size, "max_tokens: expected a positive integer");
        return PQ_ERR_INVALID;
    }
    *v = m;
    return PQ_OK;
}

pq_err_t pq_provider_stop_set(const json_t *req, json_t *obj, const char *name, int strict,
                              char *errstr, size_t errstr_size)
{
    json_t *v = json_object_get(req, "stop");
    int rc = 0;

    if (json_is_string(v) && json_string_length(v) > 0)
        rc = json_object_set_new(obj, name, json_pack("[O]", v));
    else if (json_is_array(v) && json_array_size(v) > 0)
        rc = json_object_set(obj, name, v);
    else if (strict && v && !json_is_null(v) && !json_is_array(v) && !json_is_string(v)) {
        snprintf(errstr, errstr_size, "stop: expected a string or an array of strings");
        return PQ_ERR_INVALID;
    }
    if (rc) {
        snprintf(errstr, errstr_size, "out of memory");
        return PQ_ERR_NOMEM;
    }
    return PQ_OK;
}

pq_err_t pq_provider_turn_add(json_t *turns, const char *role, const char *key, json_t *items)
{
    size_t n = json_array_size(turns);
    json_t *last = n ? json_array_get(turns, n - 1) : NULL;
    int rc;

    if (json_array_size(items) == 0) {
        json_decref(items);
        return PQ_OK;
    }
    if (last && strcmp(json_string_value(json_object_get(last, "role")), role) == 0) {
        rc = json_array_extend(json_object_get(last, key), items);
        json_decref(items);
        return rc ? PQ_ERR_NOMEM : PQ_OK;
    }
    return json_array_append_new(turns, json_pack("{s:s, s:o}", "role", role, key, items))
               ? PQ_ERR_NOMEM
               : PQ_OK;
}

int pq_provider_data_url(const char *url, const char **mt, size_t *mt_len, const char **data)
{
    const char *semi, *comma;

    if (strncmp(url, "data:", 5) != 0)
        return -1;
    semi = strchr(url + 5, ';');
    comma = semi ? strchr(semi, ',') : NULL;
    if (!semi || !comma || (size_t)(comma - semi) != sizeof(";base64") - 1 ||
        strncmp(semi, ";base64", sizeof(";base64") - 1) != 0)
        return -1;
    *mt = url + 5;
    *mt_len = (size_t)(semi - (url + 5));
    *data = comma + 1;
    return 0;
}

void pq_provider_http_error(char *errstr, size_t errstr_size, const pq_target_t *target,
                            long status, const char *token)
{
    snprintf(errstr, errstr_size, "%s answered HTTP %ld%s%s", target->p->name, status,
             token[0] ? ": " : "", token);
}

pq_err_t pq_provider_completion(json_t **completion, const char *id, json_int_t created,
                                const char *model, json_t *choices, json_int_t prompt,
                                json_int_t completion_tokens, json_int_t total, char *errstr,
                                size_t errstr_size)
{
    if (total == 0)
        total = prompt + completion_tokens;
    *completion = json_pack("{s:s, s:s, s:I, s:s, s:O, s:{s:I, s:I, s:I}}", "id", id, "object",
                            "chat.completion", "created", created, "model", model, "choices",
                            choices, "usage", "prompt_tokens", prompt, "completion_tokens",
                            completion_tokens, "total_tokens", total);
    if (!*completion) {
        snprintf(errstr, errstr_size, "out of memory");
        return PQ_ERR_NOMEM;
    }
    return PQ_OK;
}

pq_err_t pq_provider_usage_read(const pq_target_t *target, const json_t *usage,
                                const char *const *names, json_int_t *vals, size_t n, char *errstr,
                                size_t errstr_size)
{
    for (size_t i = 0; i < n; i++)
        vals[i] = 0;
    if (!usage || json_is_null(usage))
        return PQ_OK;
    if (!json_is_object(usage)) {
        snprintf(errstr, errstr_size, "%s answered a bad usage", target->p->name);
        return PQ_ERR_MALFORMED;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_object_get(usage, names[i]);
        if (!v || json_is_null(v))
            continue;
        if (!json_is_integer(v) || json_integer_value(v) < 0) {
            snprintf(errstr, errstr_size, "%s answered a bad usage.%s", target->p->name, names[i]);
            return PQ_ERR_MALFORMED;
        }
        vals[i] = json_integer_value(v);
    }
    return PQ_OK;
}

int pq_provider_content_ok(const json_t *content)
{
    size_t i;
    json_t *part;

    if (!content || json_is_null(content) || json_is_string(content))
        return 1;
    if (!json_is_array(content))
        return 0;
    json_array_foreach(content, i, part)
    {
        const char *type = json_string_value(json_object_get(part, "type"));
        if (!type || (strcmp(type, "text") == 0 && !json_is_string(json_object_get(part, "text"))))
            return 0;
    }
    return 1;
}

void pq_provider_safe_token(const json_t *v, char *buf, size_t size)
{
    const char *s = json_string_value(v);
    size_t n = s ? strlen(s) : 0;

    if (size == 0)
        return;
    buf[0] = '\0';
    if (n == 0 || n >= size || n > 64)
        return;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'))
            return;
    }
    memcpy(buf, s, n + 1);
}

/* Words longer than this are redacted whatever they hold: no prose word is that long, and it
 * bounds the work of the key-fragment test. */
#define REASON_WORD_MAX 200
/* Shared run of characters with a configured key that makes a word a key fragment. */
#define REASON_KEY_RUN 6

static int reason_alnum(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

static int reason_word_char(unsigned char c)
{
    return reason_alnum(c) || c == '_' || c == '+' || c == '/' || c == '=' || c == '.' ||
           c == '-' || c == '*';
}

/* 1 when the word w (n bytes) may be (part of) a key. */
static int reason_word_secret(const char *w, size_t n, const pq_provider_conf_t *p)
{
    static const char *const prefixes[] = {"sk-", "sk_", "AIza", "Bearer"};
    int letters = 0, digits = 0;

    if (n > REASON_WORD_MAX)
        return 1;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)w[i];
        if (c >= '0' && c <= '9')
            digits = 1;
        else if (reason_alnum(c))
            letters = 1;
        else if (c == '*' && ((i > 0 && reason_alnum((unsigned char)w[i - 1])) ||
                              (i + 1 < n && reason_alnum((unsigned char)w[i + 1]))))
            return 1; /* a masked key: "sk-abc1****wxyz" */
    }
    if (n >= 20 && letters && digits)
        return 1;
    for (size_t k = 0; k < sizeof(prefixes) / sizeof(prefixes[0]); k++)
        if (n >= strlen(prefixes[k]) && memcmp(w, prefixes[k], strlen(prefixes[k])) == 0)
            return 1;
    for (size_t k = 0; p && k < p->napi_keys; k++) {
        const char *key = p->api_keys[k];
        size_t klen = key ? strlen(key) : 0;
        /* a key shorter than the run counts whole: a configured key never shows, however
         * short */
        size_t run = klen < REASON_KEY_RUN ? klen : REASON_KEY_RUN;
        for (size_t off = 0; run > 0 && off + run <= n; off++)
            if (memmem(key, klen, w + off, run))
                return 1;
    }
    return 0;
}

/* Length of the valid UTF-8 character at s (n > 0 bytes available), 0 when it is not one
 * (bad lead or continuation byte, overlong form, surrogate, beyond U+10FFFF, cut short). */
static size_t reason_utf8_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t need;
    unsigned long cp, min;

    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
        need = 3, cp = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4, cp = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (n < need)
        return 0;
    for (size_t i = 1; i < need; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return need;
}

void pq_provider_reason_sanitize(const char *in, size_t len, const pq_provider_conf_t *p, char *out,
                                 size_t size)
{
    const unsigned char *s = (const unsigned char *)in;
    size_t cap, o = 0, i = 0;
    int pending_space = 0;

    if (size == 0)
        return;
    cap = size - 1 < PQ_PROVIDER_REASON_TEXT_MAX ? size - 1 : PQ_PROVIDER_REASON_TEXT_MAX;
    while (in && i < len && o < cap) {
        const char *piece = in + i;
        size_t n, adv, sep;
        int whole = 1; /* the piece is written whole or not at all */

        if (reason_word_char(s[i])) {
            size_t j = i;
            while (j < len && reason_word_char(s[j]))
                j++;
            adv = n = j - i;
            if (reason_word_secret(in + i, n, p))
                piece = "[redacted]", n = sizeof("[redacted]") - 1;
            else
                whole = 0; /* a plain word may be cut at the cap (ASCII only) */
        } else if (!(adv = n = reason_utf8_len(s + i, len - i))) {
            piece = "?", adv = n = 1;
        } else if ((n == 1 && (s[i] <= ' ' || s[i] == 0x7F)) ||
                   (n == 2 && s[i] == 0xC2 && s[i + 1] < 0xA0)) {
            pending_space = 1; /* space, C0/C1 control, line break, tab */
            i += adv;
            continue;
        }
        sep = pending_space && o > 0;
        if (o + sep + n > cap) {
            if (whole || o + sep >= cap)
                break;
            n = cap - o - sep;
        }
        if (sep)
            out[o++] = ' ';
        memcpy(out + o, piece, n);
        o += n;
        pending_space = 0;
        i += adv;
    }
    out[o] = '\0';
}

void pq_provider_fault_reason(pq_provider_fault_t *fault, const pq_target_t *target,
                              const json_t *v)
{
    if (!fault || !json_is_string(v))
        return;
    pq_provider_reason_sanitize(json_string_value(v), json_string_length(v),
                                target ? target->p : NULL, fault->reason, sizeof(fault->reason));
}

void pq_provider_fault_code(pq_provider_fault_t *fault, const char *token)
{
    if (fault)
        snprintf(fault->code, sizeof(fault->code), "%s", token);
}

int pq_provider_str_has(const json_t *v, const char *needle)
{
    const char *s = json_string_value(v);
    size_t n = strlen(needle);

    for (; s && *s; s++)
        if (strncasecmp(s, needle, n) == 0)
            return 1;
    return 0;
}

pq_err_t pq_provider_tool_def(const json_t *tool, size_t i, const char *provider,
                              const json_t **name, const json_t **description,
                              const json_t **parameters, char *errstr, size_t errstr_size)
{
    const char *type = json_string_value(json_object_get(tool, "type"));
    const json_t *fn = json_object_get(tool, "function"), *v;

    if (!type || strcmp(type, "function") != 0) {
        snprintf(errstr, errstr_size, "%s cannot express tools[%zu] (not a function)", provider, i);
        return PQ_ERR_UNSUPPORTED;
    }
    *name = json_object_get(fn, "name");
    if (!json_is_string(*name) || json_string_length(*name) == 0) {
        snprintf(errstr, errstr_size, "tools[%zu].function.name is required", i);
        return PQ_ERR_INVALID;
    }
    v = json_object_get(fn, "description");
    *description = json_is_string(v) ? v : NULL;
    v = json_object_get(fn, "parameters");
    *parameters = json_is_object(v) ? v : NULL;
    return PQ_OK;
}

pq_err_t pq_provider_tool_call(const json_t *call, size_t mi, size_t j, const char *provider,
                               const json_t **id, const json_t **name, json_t **args, char *errstr,
                               size_t errstr_size)
{
    const json_t *fn = json_object_get(call, "function");
    const char *type = json_string_value(json_object_get(call, "type"));
    const char *a = json_string_value(json_object_get(fn, "arguments"));

    *args = NULL;
    if (type && strcmp(type, "function") != 0) {
        snprintf(errstr, errstr_size,
                 "%s cannot express messages[%zu].tool_calls[%zu] (not a "
                 "function)",
                 provider, mi, j);
        return PQ_ERR_UNSUPPORTED;
    }
    *id = json_object_get(call, "id");
    *name = json_object_get(fn, "name");
    if (!json_is_string(*id) || !json_is_string(*name)) {
        snprintf(errstr, errstr_size,
                 "messages[%zu].tool_calls[%zu]: id and function.name are required", mi, j);
        return PQ_ERR_INVALID;
    }
    *args = (a && *a) ? json_loads(a, JSON_ALLOW_NUL, NULL) : json_object();
    if (!json_is_object(*args)) {
        json_decref(*args);
        *args = NULL;
        snprintf(errstr, errstr_size,
                 "messages[%zu].tool_calls[%zu].function.arguments: not a JSON object", mi, j);
        return PQ_ERR_INVALID;
    }
    return PQ_OK;
}

json_t *pq_provider_tool_call_new(const char *id, const char *name, const json_t *args)
{
    char *a = args ? json_dumps(args, JSON_COMPACT) : strdup("{}");
    json_t *call = a ? json_pack("{s:s, s:s, s:{s:s, s:s}}", "id", id, "type", "function",
                                 "function", "name", name, "arguments", a)
                     : NULL;
    free(a);
    return call;
}

int pq_provider_field_set(const json_t *v)
{
    if (!v || json_is_null(v) || json_is_false(v))
        return 0;
    if (json_is_number(v))
        return json_number_value(v) != 0.0;
    if (json_is_string(v))
        return json_string_length(v) > 0;
    if (json_is_array(v))
        return json_array_size(v) > 0;
    if (json_is_object(v))
        return json_object_size(v) > 0;
    return 1;
}

char *pq_provider_escape(const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = strlen(s), o = 0;
    char *out = malloc(3 * n + 1);

    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '.' || c == '_' || c == '~') {
            out[o++] = (char)c;
        } else {
            out[o++] = '%';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        }
    }
    out[o] = '\0';
    return out;
}
