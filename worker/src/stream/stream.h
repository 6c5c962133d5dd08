/* Live token streaming: upstream stream decoders, the assembler of one attempt's chunks, and
 * the relay rendering of a chunk for clients.
 *
 *   bytes (any split) -> pq_stream_feed -> pq_sse (sse.h) -> format decoder -> chunks (callback)
 *   chunks -> pq_stream_asm_add -> pq_stream_asm_completion: the OpenAI chat.completion a
 *   non-streamed call gives (each provider adapter's parse_response), and how the stream ended.
 *   chunk -> pq_stream_chunk_render: an OpenAI chat.completion.chunk for clients, whatever the
 *   provider.
 *
 * Formats:
 *   OPENAI (OpenAI, Azure OpenAI, compatible servers): data events holding
 *     chat.completion.chunk objects (choices[].delta {role, content, refusal, tool_calls}, index,
 *     finish_reason), "data: [DONE]"; a chunk with empty choices and usage (stream_options
 *     include_usage); {"error": {...}} in a data event.
 *   ANTHROPIC: message_start (id, model, input usage), content_block_start (text, tool_use),
 *     content_block_delta (text_delta, input_json_delta; thinking deltas skipped),
 *     content_block_stop, message_delta (stop_reason, output usage), message_stop, ping, error.
 *   GEMINI (streamGenerateContent?alt=sse): each data event a GenerateContentResponse:
 *     candidates[] (content.parts[].text, thought parts skipped; finishReason; index),
 *     usageMetadata, modelVersion, responseId, promptFeedback.blockReason (a content_filter
 *     error), {"error": {...}}.
 *   WATSONX (text/chat_stream): OpenAI-like chunks (model_id for model, choices[].delta,
 *     finish_reason, usage on the last chunk); {"errors": [...]} events.
 *
 * Pure: no I/O, no logging, no globals. */
#ifndef PQ_STREAM_STREAM_H
#define PQ_STREAM_STREAM_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "promptq/err.h"

typedef enum {
    PQ_STREAM_OPENAI = 0, /* also Azure OpenAI and OpenAI-compatible servers */
    PQ_STREAM_ANTHROPIC,
    PQ_STREAM_GEMINI,
    PQ_STREAM_WATSONX,
} pq_stream_format_t;

/* The format for a provider type of the config ("openai", "azure_openai", "anthropic",
 * "gemini", "watsonx"; other types speak OpenAI's). */
pq_stream_format_t pq_stream_format_for(const char *provider_type);

/* Most choices (OpenAI n) and tool calls per choice a stream may carry (PQ_ERR_MALFORMED
 * beyond: an index this large is not a real answer). */
#define PQ_STREAM_MAX_CHOICES 16
#define PQ_STREAM_MAX_TOOLS   64

typedef enum {
    /* Something for one choice: role, text, a tool-call delta and/or its finish reason. */
    PQ_STREAM_CHUNK_DELTA = 0,
    /* Token counts so far (the last one seen is the answer's usage). */
    PQ_STREAM_CHUNK_USAGE,
    /* The provider reported an error inside the stream; no more chunks are expected. */
    PQ_STREAM_CHUNK_ERROR,
    /* The stream's own end marker ([DONE], message_stop). */
    PQ_STREAM_CHUNK_DONE,
} pq_stream_chunk_kind_t;

/* One chunk. Every pointer is borrowed from the decoder, valid only during the callback (copy
 * what you keep); strings are NUL-terminated; NULL means "not in this chunk". */
typedef struct {
    pq_stream_chunk_kind_t kind;
    /* Known on every chunk once the stream said it (else NULL / 0). */
    const char *id;
    const char *model;
    int64_t created; /* seconds; 0 when the provider gave none */

    /* DELTA */
    int index;        /* the choice, 0 .. PQ_STREAM_MAX_CHOICES - 1 */
    const char *role; /* "assistant" on a choice's first chunk, when the provider says it */
    const char *text; /* text to append to the choice's content */
    size_t text_len;
    int tool;              /* 1 when this chunk carries a tool-call delta (the tool_* fields) */
    int tool_index;        /* which tool call of the choice, 0 .. PQ_STREAM_MAX_TOOLS - 1 */
    const char *tool_id;   /* set on the call's first delta */
    const char *tool_name; /* set on the call's first delta */
    const char *tool_args; /* a piece of the arguments JSON text to append */
    size_t tool_args_len;  /* bytes of tool_args */
    const char *finish;    /* OpenAI's stop | length | content_filter | tool_calls */

    /* USAGE */
    int64_t prompt_tokens, completion_tokens, total_tokens;

    /* ERROR */
    pq_err_t error;         /* the class: PQ_ERR_OVERLOADED, _RATE_LIMITED, _SERVER, ... */
    const char *error_code; /* the provider's error type/code when it is a plain word, or "" */
    const char *error_text; /* the provider's message, raw: it may echo a key (G6); sanitise
                               (pq_provider_reason_sanitize) before showing it. "" if none */
} pq_stream_chunk_t;

/* Called once per chunk. chunk: borrowed. opaque: the caller's pointer. Returning anything but
 * PQ_OK stops the decoder: pq_stream_feed returns that code, now and later. */
typedef pq_err_t (*pq_stream_chunk_cb)(const pq_stream_chunk_t *chunk, void *opaque);

typedef struct pq_stream_s pq_stream_t;

/* A decoder for one attempt's answer body (free with pq_stream_destroy). max_event_bytes caps a
 * line and an event's data (0: PQ_SSE_DEFAULT_MAX, 1 MiB). NULL with a message in errstr when
 * out of memory. */
pq_stream_t *pq_stream_new(pq_stream_format_t format, size_t max_event_bytes, char *errstr,
                           size_t errstr_size);

/* Frees the decoder. NULL is a no-op. */
void pq_stream_destroy(pq_stream_t *st);

/* Feeds len bytes of the body (buf: borrowed, any split), calling cb for each chunk decoded.
 * Returns PQ_OK; PQ_ERR_TOO_LARGE (an event over the cap); PQ_ERR_MALFORMED (an event that is
 * not the format's JSON, a choice or tool index past the caps); PQ_ERR_NOMEM; or the callback's
 * code. Errors are sticky; pq_stream_errstr says which event failed. A provider error event is
 * not a failure here: it arrives as a PQ_STREAM_CHUNK_ERROR chunk. */
pq_err_t pq_stream_feed(pq_stream_t *st, const char *buf, size_t len, pq_stream_chunk_cb cb,
                        void *opaque);

/* on: a malformed event (PQ_ERR_MALFORMED) that produced no chunk is skipped and counted
 * instead of failing the stream (provider setting stream_malformed "skip"); an event that
 * produced some chunks before failing still fails. Default off (fail over). */
void pq_stream_skip_malformed(pq_stream_t *st, int on);

/* Malformed events skipped so far. */
uint64_t pq_stream_skipped(const pq_stream_t *st);

/* The body ended. Returns 1 when it ended inside an event (cut mid-event), else 0. */
int pq_stream_finish(pq_stream_t *st);

/* Why the last failing pq_stream_feed failed ("event 3: invalid JSON"), "" when it did not.
 * Borrowed; never quotes the body. */
const char *pq_stream_errstr(const pq_stream_t *st);

/* ---- assembler ---- */

typedef struct pq_stream_asm_s pq_stream_asm_t;

typedef enum {
    /* No end yet: no [DONE]/message_stop, and some choice without a finish reason (or none at
     * all). When the body is over, the answer was cut. */
    PQ_STREAM_END_CUT = 0,
    /* [DONE] / message_stop seen, or every choice seen has its finish reason (a stream that
     * says nothing after its finish reason, e.g. Gemini, is finalised at once, with the usage
     * seen so far). */
    PQ_STREAM_END_CLEAN,
    /* The provider sent an error event (pq_stream_asm_error). */
    PQ_STREAM_END_ERROR,
} pq_stream_end_t;

/* A new assembler (free with pq_stream_asm_destroy). max_bytes caps the assembled text, tool
 * arguments, ids and names together (0: no cap). NULL when out of memory. */
pq_stream_asm_t *pq_stream_asm_new(size_t max_bytes);

void pq_stream_asm_destroy(pq_stream_asm_t *a);

/* Folds a chunk in (chunk: borrowed; strings are copied). Returns PQ_OK, PQ_ERR_TOO_LARGE
 * (past max_bytes: the assembler then refuses every later chunk too), PQ_ERR_MALFORMED (an
 * index past the caps) or PQ_ERR_NOMEM. Has the signature of a pq_stream_chunk_cb with the
 * assembler as opaque, through pq_stream_asm_cb. */
pq_err_t pq_stream_asm_add(pq_stream_asm_t *a, const pq_stream_chunk_t *chunk);

/* pq_stream_asm_add as a pq_stream_chunk_cb: opaque is the pq_stream_asm_t. */
pq_err_t pq_stream_asm_cb(const pq_stream_chunk_t *chunk, void *opaque);

/* How the stream stands: clean, cut or error (see pq_stream_end_t). */
pq_stream_end_t pq_stream_asm_end(const pq_stream_asm_t *a);

/* The provider's error when pq_stream_asm_end is PQ_STREAM_END_ERROR, else PQ_OK. code, text:
 * when not NULL, set to the provider's code and raw message (borrowed from a, "" if none). */
pq_err_t pq_stream_asm_error(const pq_stream_asm_t *a, const char **code, const char **text);

/* Text bytes and tool-argument bytes assembled so far. */
size_t pq_stream_asm_bytes(const pq_stream_asm_t *a);

/* New reference: the OpenAI chat.completion {id, object "chat.completion", created, model,
 * choices [{index, message {role, content[, tool_calls]}, finish_reason, logprobs null}], usage
 * {prompt_tokens, completion_tokens, total_tokens}} from the chunks so far, choices in index
 * order. Fallbacks when the stream did not say: id "chatcmpl-stream", created `created`, model
 * `model` (borrowed), role "assistant", finish_reason "stop" (a cut stream has none: callers
 * check pq_stream_asm_end first), total = prompt + completion. A choice with tool calls and no
 * text has content null. NULL when out of memory. */
json_t *pq_stream_asm_completion(const pq_stream_asm_t *a, const char *model, int64_t created);

/* ---- relay ---- */

/* Renders chunk as the text of one SSE data field for clients: an OpenAI chat.completion.chunk
 * ({id, object, created, model, choices [{index, delta {role?, content?, tool_calls?},
 * finish_reason}]}; a USAGE chunk has choices [] and usage), "[DONE]" for DONE, and
 * {"error": {"type": <pq_err_name>, "code", "message"}} for ERROR (message: the provider's raw
 * text, so callers sanitise it first, or pass NULL to leave it out). model, created: fallbacks
 * when the chunk has none. Returns a new string (free()), compact JSON, no line break, with its
 * length in *len when len is not NULL; NULL when out of memory. */
char *pq_stream_chunk_render(const pq_stream_chunk_t *chunk, const char *model, int64_t created,
                             const char *error_message, size_t *len);

#endif
