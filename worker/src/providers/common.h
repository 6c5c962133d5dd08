/* Small helpers shared by the provider adapters (pure, no I/O). Internal to the worker. */
#ifndef PQ_PROVIDER_COMMON_H
#define PQ_PROVIDER_COMMON_H

#include <stddef.h>
#include <curl/curl.h>
#include <jansson.h>

#include "provider.h"

/* ---- building the request ---- */

/* First step of build_request: zeroes out, then PQ_OK, or PQ_ERR_INVALID ("request is not an
 * object") when request is not a JSON object. */
pq_err_t pq_provider_req_start(const json_t *request, pq_provider_req_t *out, char *errstr,
                               size_t errstr_size);

/* Last step of build_request, on its one exit path: returns err; unless it is PQ_OK, clears out
 * (pq_provider_req_clear), and on PQ_ERR_NOMEM writes "out of memory" into errstr (other errors
 * keep their message). */
pq_err_t pq_provider_req_end(pq_provider_req_t *out, pq_err_t err, char *errstr,
                             size_t errstr_size);

/* PQ_ERR_INVALID ("messages: a non-empty array is required") unless msgs is a non-empty array. */
pq_err_t pq_provider_messages_check(const json_t *msgs, char *errstr, size_t errstr_size);

/* The role of message i, or NULL with PQ_ERR_INVALID's message ("messages[i]: an object with a
 * role is required") in errstr when m is not an object with a string role. */
const char *pq_provider_message_role(const json_t *m, size_t i, char *errstr, size_t errstr_size);

/* PQ_ERR_CONFIG ("providers.NAME: <what> contains a line break") when key holds a CR or LF (it
 * would split a header), else PQ_OK. key may be NULL. The key is never copied into errstr. */
pq_err_t pq_provider_key_check(const pq_provider_conf_t *p, const char *key, const char *what,
                               char *errstr, size_t errstr_size);

/* Sets out->body (new) to body as compact JSON, out->body_len, and appends the header
 * "Content-Type: application/json". Returns 0, or -1 when out of memory. */
int pq_provider_req_json(pq_provider_req_t *out, const json_t *body);

/* The OpenAI stream fields of an OpenAI-shaped body (body: borrowed, changed): stream 0 drops
 * "stream" and "stream_options"; stream 1 sets "stream": true and "stream_options":
 * {"include_usage": true}. Returns 0, or -1 when out of memory. */
int pq_provider_stream_fields(json_t *body, int stream);

/* Sets out->url (new) from a printf format. Returns 0, or -1 when out of memory (out->url stays
 * NULL). */
int pq_provider_req_url(pq_provider_req_t *out, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Appends "name: value" to *list. The temporary line (it may hold a key) is wiped. Returns 0,
 * or -1 when out of memory (*list unchanged). */
int pq_provider_header_add(struct curl_slist **list, const char *name, const char *value);

/* Appends "Authorization: Bearer <token>" to *list; the temporary line is wiped. Returns 0, or
 * -1 when out of memory (*list unchanged). */
int pq_provider_header_add_bearer(struct curl_slist **list, const char *token);

/* Appends the provider's configured extra headers (p->headers, p->nheaders) to *list, in order.
 * max_line: when not 0, a header whose "name: value" line has max_line bytes or more is
 * PQ_ERR_CONFIG ("providers.NAME.headers.HEADER: too long"). Returns PQ_OK, PQ_ERR_CONFIG or
 * PQ_ERR_NOMEM ("out of memory"), with errstr set on errors; the headers already appended stay
 * in *list (the caller frees the list). */
pq_err_t pq_provider_headers_add_conf(struct curl_slist **list, const pq_provider_conf_t *p,
                                      size_t max_line, char *errstr, size_t errstr_size);

/* ---- mapping the request body ---- */

/* The completion length asked for: max_completion_tokens when set (pq_provider_field_set),
 * else max_tokens. *v: the value (borrowed from req), NULL when neither is set. Returns PQ_OK,
 * or PQ_ERR_INVALID ("max_tokens: expected a positive integer") when it is not an integer >= 1. */
pq_err_t pq_provider_max_tokens(const json_t *req, json_t **v, char *errstr, size_t errstr_size);

/* Sets obj[name] to the request's "stop" as an array: a non-empty string becomes a one-element
 * array, a non-empty array is kept; an empty or absent stop sets nothing. strict: a stop of
 * another type (not null) is PQ_ERR_INVALID ("stop: expected a string or an array of strings");
 * else it is ignored. Returns PQ_OK, PQ_ERR_INVALID or PQ_ERR_NOMEM (errstr set on errors). */
pq_err_t pq_provider_stop_set(const json_t *req, json_t *obj, const char *name, int strict,
                              char *errstr, size_t errstr_size);

/* Adds one turn {"role": role, key: items} to the array turns, or, when the last turn has the
 * same role, appends items to its key array (for providers that want alternating turns). items:
 * taken; an empty array adds nothing. Returns PQ_OK or PQ_ERR_NOMEM. */
pq_err_t pq_provider_turn_add(json_t *turns, const char *role, const char *key, json_t *items);

/* Parses "data:<media type>;base64,<data>": 0 with the media type (*mt, *mt_len bytes, not
 * NUL-terminated) and the data (*data, up to the end of url), -1 if url is not such a URL. */
int pq_provider_data_url(const char *url, const char **mt, size_t *mt_len, const char **data);

/* ---- tools ---- */

/* One entry of an OpenAI request's "tools" (tools[i]): its function's name, description and
 * parameters (borrowed; description and parameters NULL when absent or not a string / object).
 * PQ_ERR_UNSUPPORTED ("<provider> cannot express tools[i] (not a function)") for another type,
 * PQ_ERR_INVALID when the name is missing. */
pq_err_t pq_provider_tool_def(const json_t *tool, size_t i, const char *provider,
                              const json_t **name, const json_t **description,
                              const json_t **parameters, char *errstr, size_t errstr_size);

/* One entry of an assistant message's "tool_calls" (messages[mi].tool_calls[j]): its id and
 * function name (borrowed) and its arguments parsed into a new JSON object (*args; "" or absent
 * arguments are {}). PQ_ERR_UNSUPPORTED for a call that is not a function, PQ_ERR_INVALID when id
 * or name is missing or the arguments are not a JSON object. */
pq_err_t pq_provider_tool_call(const json_t *call, size_t mi, size_t j, const char *provider,
                               const json_t **id, const json_t **name, json_t **args, char *errstr,
                               size_t errstr_size);

/* An OpenAI tool_calls entry {id, type "function", function {name, arguments}} whose arguments
 * are args dumped compact (NULL: "{}"). New reference, NULL when out of memory. */
json_t *pq_provider_tool_call_new(const char *id, const char *name, const json_t *args);

/* ---- reading the answer ---- */

/* Copies an error type or code into buf when it is a word of letters and underscores (at most
 * 64 and shorter than size): such vocabulary ("rate_limit_error", "RESOURCE_EXHAUSTED") cannot
 * be a key, which always has digits or dashes. Anything else leaves buf empty: error bodies may
 * echo keys (G6). */
void pq_provider_safe_token(const json_t *v, char *buf, size_t size);

/* Longest reason text kept by pq_provider_reason_sanitize (bytes, before the NUL). */
#define PQ_PROVIDER_REASON_TEXT_MAX 300

/* Copies a provider's error message (in, len bytes, not NUL-terminated) into out as text fit to
 * show a client: at most size - 1 and at most PQ_PROVIDER_REASON_TEXT_MAX bytes, cut at a UTF-8
 * character boundary, invalid UTF-8 bytes as '?', control characters (line breaks and tabs
 * included) as spaces, runs of spaces collapsed and trimmed. No key fragment survives: each word
 * (a maximal run of [A-Za-z0-9_+/=.*-]) is replaced by "[redacted]" when it shares 6 or more
 * consecutive characters with one of p's api_keys, is 20 characters or longer with both letters
 * and digits, is longer than 200 characters, starts with "sk-", "sk_", "AIza" or "Bearer", or has
 * a '*' next to a letter or digit (a masked key such as "sk-abc1****wxyz"). Pure; p may be NULL
 * (no configured keys). in: borrowed. out: size bytes, always NUL-terminated when size > 0. */
void pq_provider_reason_sanitize(const char *in, size_t len, const pq_provider_conf_t *p, char *out,
                                 size_t size);

/* Sets fault->reason to the sanitised string v (pq_provider_reason_sanitize with target's
 * provider) when fault is not NULL and v is a JSON string; else leaves it as is. */
void pq_provider_fault_reason(pq_provider_fault_t *fault, const pq_target_t *target,
                              const json_t *v);

/* Sets fault->code to token (a pq_provider_safe_token result) when fault is not NULL. */
void pq_provider_fault_code(pq_provider_fault_t *fault, const char *token);

/* 1 when the string v contains needle, ignoring ASCII case; 0 when v is not a string. */
int pq_provider_str_has(const json_t *v, const char *needle);

/* Classifies an OpenAI-shaped error answer (OpenAI, Azure OpenAI, compatible servers):
 * err is pq_err_from_http_status(status); error is the body's "error" object (or NULL). Returns
 * the refined code: code (or type) "context_length_exceeded", or a 400 whose message says
 * "maximum context length" -> PQ_ERR_CONTEXT_LENGTH; "content_policy_violation" /
 * "content_filter" or innererror.code "ResponsibleAIPolicyViolation" -> PQ_ERR_CONTENT_FILTER;
 * other codes keep err. Fills fault when not NULL: code (the error's code, else its type),
 * key_wide for a 429 "insufficient_quota", reason for context length, content filter, refused
 * and not found. Implemented in openai.c. */
pq_err_t pq_provider_openai_fault(const pq_target_t *target, pq_err_t err, const json_t *error,
                                  pq_provider_fault_t *fault);

/* Writes "<provider> answered HTTP <status>[: <token>]" into errstr (token: from
 * pq_provider_safe_token, "" for none). */
void pq_provider_http_error(char *errstr, size_t errstr_size, const pq_target_t *target,
                            long status, const char *token);

/* Sets *completion to a new OpenAI chat.completion {id, object "chat.completion", created, model,
 * choices, usage {prompt_tokens, completion_tokens, total_tokens}}; a total of 0 becomes prompt +
 * completion. Strings are copied; choices: borrowed (the object takes its own reference).
 * Returns PQ_OK, or PQ_ERR_NOMEM ("out of memory" in errstr, *completion NULL). */
pq_err_t pq_provider_completion(json_t **completion, const char *id, json_int_t created,
                                const char *model, json_t *choices, json_int_t prompt,
                                json_int_t completion_tokens, json_int_t total, char *errstr,
                                size_t errstr_size);

/* Reads the token counts names[0..n-1] of a 2xx answer's usage object into vals[0..n-1]: a
 * count that is absent or null is 0. A usage that is present, not null and not an object, or a
 * count that is not a non-negative integer (-3, 1.5, "7"), is PQ_ERR_MALFORMED ("<provider>
 * answered a bad usage.<name>" in errstr): a provider that cannot count is not trusted with the
 * answer either, and the next attempt may answer well; clamping would bill a wrong count. */
pq_err_t pq_provider_usage_read(const pq_target_t *target, const json_t *usage,
                                const char *const *names, json_int_t *vals, size_t n, char *errstr,
                                size_t errstr_size);

/* 1 when a 2xx answer's message content is something a client can read: absent, null, a string,
 * or an array of parts that are objects with a string "type" whose "text" parts hold a string
 * "text" (other part types, such as Mistral's "thinking", pass). 0 otherwise ("content": 5): the
 * caller answers PQ_ERR_MALFORMED. */
int pq_provider_content_ok(const json_t *content);

/* ---- misc ---- */

/* 1 when an optional request field is present with a value that asks for something (not null,
 * false, 0, "" or an empty array/object). */
int pq_provider_field_set(const json_t *v);

/* Percent-encodes s (unreserved characters A-Z a-z 0-9 - . _ ~ kept, the rest %XX): a URL path
 * segment, a query value or an application/x-www-form-urlencoded value. New string (free()),
 * NULL when out of memory. */
char *pq_provider_escape(const char *s);

#endif
