/* promptq-sim internals: a provider simulator on one libevent loop.
 *
 * Layout: sim_main.c (flags, loop, signals), sim_server.c (listeners, modes, pending calls,
 * control API, stats), sim_state.c (the control state: pure parse/serialise), sim_core.c (the
 * shared "answer for this prompt" core), and one file per wire format (sim_openai.c, ...), each
 * exporting a table of routes listed in sim_routes.c. Adding a format touches that one new file
 * and one line of sim_routes.c.
 *
 * Control API (on --control, and on --listen while it is up):
 *   POST /_sim/state  a whole state; absent fields take their defaults:
 *     mode            ok | down | error | rate_limit | hang | malformed | reset | stall
 *                     reset: read the request, then close with a TCP reset, no answer;
 *                     stall: status line, headers (Content-Length of the whole body) and half
 *                     a good answer's body, then nothing until the state changes
 *     status          error mode / failure_rate status (100-599, default 500; 200 with
 *                     error_body is a raw 200 answer)
 *     retry_after     "1" by default (429s; error mode only when given); null or "": none
 *     retry_after_ms, latency_ms (delay before any answer, reset and stall), failure_rate
 *     error_body      raw body of simulated errors (wins over error_code)
 *     error_code      the format's own error document carrying this code: OpenAI/Azure
 *                     error.code (type from status: invalid_request_error, rate_limit_error,
 *                     insufficient_quota), Anthropic error.type, Gemini error.status, watsonx
 *                     errors[0].code; error_message its message
 *     schedule        {"period_ms": N, "down_ms": M, "down": {state}}: for the first M ms of
 *                     every N ms since the state was applied, "down" applies instead
 *     models          {"<model>": {state}}: chat calls for that model (OpenAI/Anthropic body
 *                     "model", Azure deployment, Gemini path model, watsonx "model_id") meet
 *                     it instead of the top level; non-chat routes meet the top level
 *     revoke_tokens   top level only
 *     chunk_ms        streamed answers (OpenAI/Azure/watsonx "stream": true, watsonx
 *                     /ml/v1/text/chat_stream, Anthropic "stream": true, Gemini
 *                     :streamGenerateContent?alt=sse): delay between SSE events, 0 (default):
 *                     all at once. The answer text is cut into one event per word.
 *     stream_cut_after  N: close the connection after the Nth event (no end marker, no final
 *                     chunk); stream_malformed_at N: the Nth event's data is cut in half (not
 *                     JSON); stream_no_done true: no [DONE] (OpenAI, Azure) nor
 *                     message_stop (Anthropic); Gemini and watsonx have no end marker. Events count
 * from 1, every event of the stream (role/start and usage events included). "down" only at the top
 * level (not in models nor in a schedule's down: a 400 names it). GET /_sim/state; GET /_sim/stats
 * (by_status, by_path, by_model {"<model>": {requests, by_status}}, ...); GET /_sim/log {"calls":
 * [{t_ms, model, path, status, outcome}]} for the last 1000 chat calls (t_ms: arrival, monotonic ms
 * since start; status 0: no answer; outcome ok|error|rate_limit|reset|hang|stall|malformed); POST
 * /_sim/reset zeroes the stats and clears by_model and the log. */
#ifndef PROMPTQ_SIM_H
#define PROMPTQ_SIM_H

#include <stddef.h>
#include <stdint.h>

#include <event2/event.h>
#include <event2/http.h>
#include <jansson.h>

/* Largest request body accepted (evhttp answers 413 above it). */
#define PQ_SIM_MAX_BODY (16u << 20)
/* Distinct keys kept in stats by_path and in the models list (beyond: "other" / not added). */
#define PQ_SIM_MAX_KEYS     256
#define PQ_SIM_MAX_API_KEYS 16

/* ---- control state (sim_state.c) ---- */

typedef enum {
    PQ_SIM_MODE_OK = 0,
    PQ_SIM_MODE_DOWN,
    PQ_SIM_MODE_ERROR,
    PQ_SIM_MODE_RATE_LIMIT,
    PQ_SIM_MODE_HANG,
    PQ_SIM_MODE_MALFORMED,
    PQ_SIM_MODE_RESET, /* read the request, then close with a reset, no answer */
    PQ_SIM_MODE_STALL, /* status line, headers and half a good body, then nothing */
} pq_sim_mode_t;

/* Most models with their own state in one control state. */
#define PQ_SIM_MAX_MODEL_STATES PQ_SIM_MAX_KEYS
/* Longest model name kept (state keys, stats by_model, the call log). */
#define PQ_SIM_MODEL_MAX 200

typedef struct pq_sim_state_s pq_sim_state_t;
typedef struct pq_sim_model_state_s pq_sim_model_state_t;

struct pq_sim_state_s {
    pq_sim_mode_t mode;
    int status;                  /* error mode and failure_rate answers; default 500 */
    char retry_after[64];        /* Retry-After value; default "1" */
    int retry_after_set;         /* retry_after given explicitly (then also sent in error mode) */
    int retry_after_none;        /* retry_after null or "": no Retry-After header, even on 429 */
    int64_t retry_after_ms;      /* -1: no retry-after-ms header */
    int64_t latency_ms;          /* delay before every answer (not down/hang) */
    int64_t chunk_ms;            /* streamed answers: delay between events; 0: all at once */
    int64_t stream_cut_after;    /* streamed: close the connection after N events; 0: never */
    int64_t stream_malformed_at; /* streamed: event N's data is broken JSON; 0: none */
    int stream_no_done;          /* streamed: leave out the end marker ([DONE], message_stop) */
    int reject_prefill;          /* a trailing assistant message (a prefill) is a 400 */
    double failure_rate;         /* ok mode: this fraction of answers become `status` */
    char *error_body;            /* owned; NULL: the format's own error JSON */
    char *error_code;    /* owned; NULL: none. The format's own error code (error documents) */
    char *error_message; /* owned; NULL: a default message */
    int revoke_tokens;   /* applying this state revokes every IAM token issued so far */
    /* Flapping: for the first down_ms of every period_ms (from when the state was applied)
     * sched_down applies instead of this state. period_ms 0: no schedule. */
    int64_t period_ms, down_ms;
    pq_sim_state_t *sched_down;   /* owned; NULL without a schedule */
    pq_sim_model_state_t *models; /* owned array (top level only): per-model states */
    size_t nmodels;
};

struct pq_sim_model_state_s {
    char *name; /* owned */
    pq_sim_state_t state;
};

/* Defaults: ok, 500, "1", no ms, 0, 0.0, no body, no code, no schedule, no models. */
void pq_sim_state_init(pq_sim_state_t *st);

/* Frees what st owns; st stays usable (defaults). NULL is a no-op. */
void pq_sim_state_clear(pq_sim_state_t *st);

/* Parses a whole-state JSON body (absent fields take defaults) into out, which it initialises.
 * Accepts "models" {name: state} (no "down", "models" or "revoke_tokens" inside) and
 * "schedule" {period_ms, down_ms, down: state} (no "down", "models" or "schedule" inside).
 * Returns 0, or -1 with a message naming the field's JSON path in errstr (out is then
 * cleared). Pure. */
int pq_sim_state_parse(const char *buf, size_t len, pq_sim_state_t *out, char *errstr,
                       size_t errstr_size);

/* The state a call for model (NULL or "": none) meets elapsed_ms after top was applied: the
 * model's own state if top has one, else top; then its schedule's down state when elapsed_ms
 * falls in a down window. Borrowed from top. Pure. */
const pq_sim_state_t *pq_sim_state_pick(const pq_sim_state_t *top, const char *model,
                                        int64_t elapsed_ms);

/* New reference: the state as JSON. */
json_t *pq_sim_state_to_json(const pq_sim_state_t *st);

const char *pq_sim_mode_name(pq_sim_mode_t mode);

/* ---- answer core (sim_core.c) ---- */

typedef struct {
    char *text; /* new: "echo: " + prompt, possibly truncated; NUL-terminated */
    size_t len;
    int truncated; /* cut to 4 * max_tokens bytes: finish "length" */
} pq_sim_answer_t;

/* The deterministic answer for a prompt. max_tokens <= 0: no limit. Truncation keeps UTF-8
 * sequences whole. Returns 0, or -1 when out of memory. Pure. */
int pq_sim_core_answer(const char *prompt, size_t len, int64_t max_tokens, pq_sim_answer_t *out);

void pq_sim_answer_free(pq_sim_answer_t *a);

/* An assistant prefill: when the answer starts with it, the answer becomes the rest (the model
 * continues the prefill). Pure. */
void pq_sim_core_continue(pq_sim_answer_t *a, const char *prefill, size_t len);

/* Token estimate: bytes / 4 rounded up, at least 1. */
int64_t pq_sim_core_tokens(size_t bytes);

/* Text of an OpenAI-style content value: a string, or an array of parts whose "text" parts are
 * concatenated, or null (""). Returns 0 with *out new (NUL-terminated; caller frees) or -1 when
 * content is none of those. Pure. */
int pq_sim_core_text(const json_t *content, char **out, size_t *len);

/* End (exclusive) of the piece of text that starts at off: the spaces there and the word after
 * them, so pieces joined give text back. Streamed answers send one piece per event. Pure. */
size_t pq_sim_core_piece_end(const char *text, size_t len, size_t off);

/* Appends doc as compact JSON to out with a single evbuffer_add (one copy, no per-token calls).
 * Returns 0, or -1 if doc cannot be serialised. */
struct evbuffer;
int pq_sim_core_dump(const json_t *doc, struct evbuffer *out);

/* ---- calls and routes (sim_server.c, one file per format) ---- */

typedef struct pq_sim_s pq_sim_t;
typedef struct pq_sim_call_s pq_sim_call_t;

typedef enum {
    PQ_SIM_E_INVALID = 0, /* 400 and other client errors */
    PQ_SIM_E_AUTH,        /* 401 */
    PQ_SIM_E_NOT_FOUND,   /* 404, 405 */
    PQ_SIM_E_RATE,        /* 429 */
    PQ_SIM_E_SERVER,      /* 5xx */
} pq_sim_ekind_t;

typedef struct {
    pq_sim_ekind_t kind;
    const char *message;
    const char *param; /* may be NULL */
    const char *code;  /* may be NULL */
    /* 1: code is the control state's error_code, the format's own identifier for the error
     * (Anthropic error.type, Gemini error.status, OpenAI/watsonx code). */
    int provider_code;
} pq_sim_error_t;

typedef struct {
    const char *name;
    /* Copies the API key the client presented into buf; returns 0, or -1 when there is none. */
    int (*auth_key)(struct evhttp_request *req, char *buf, size_t size);
    /* Writes this format's error document with pq_sim_call_json(). */
    void (*error)(pq_sim_call_t *call, int status, const pq_sim_error_t *err);
} pq_sim_format_t;

typedef struct {
    const pq_sim_format_t *format;
    int method; /* EVHTTP_REQ_GET / EVHTTP_REQ_POST */
    /* 1 if path belongs to this route; may copy a path parameter with pq_sim_call_set_arg(). */
    int (*match)(const char *path, pq_sim_call_t *call);
    /* Answers a call in ok mode: a good answer or a validation error. */
    void (*handle)(pq_sim_call_t *call);
    int needs_auth;
    /* Chat routes: the body field naming the model ("model", "model_id"), or "" when the
     * model is the path parameter (Azure deployment, Gemini model). NULL: not a chat route
     * (top-level state only, not in stats by_model nor the call log). */
    const char *model_key;
} pq_sim_route_t;

/* Route tables, each ended by an entry with match == NULL (sim_routes.c lists them). */
extern const pq_sim_route_t pq_sim_openai_routes[];
extern const pq_sim_route_t pq_sim_azure_routes[];
extern const pq_sim_route_t pq_sim_anthropic_routes[];
extern const pq_sim_route_t pq_sim_gemini_routes[];
extern const pq_sim_route_t pq_sim_watsonx_routes[];
extern const pq_sim_route_t *const pq_sim_route_tables[];
/* Format used for answers to paths no route matches. */
extern const pq_sim_format_t pq_sim_openai_format;

/* The request body, linearised (borrowed, valid for the call's life; not NUL-terminated). */
const char *pq_sim_call_body(pq_sim_call_t *call, size_t *len);

/* The evhttp request (borrowed). */
struct evhttp_request *pq_sim_call_request(pq_sim_call_t *call);

/* Path parameter stored by a route's match (e.g. a model named in the path), or "". */
const char *pq_sim_call_arg(const pq_sim_call_t *call);
void pq_sim_call_set_arg(pq_sim_call_t *call, const char *s, size_t len);

/* Sets the answer: status and body doc (taken: decref'd here), Content-Type application/json. */
void pq_sim_call_json(pq_sim_call_t *call, int status, json_t *doc);

/* Sets an error answer in the call's format (validation errors of a handler; the simulated
 * errors of the control state go through the server, which honours its error_body). */
void pq_sim_call_error(pq_sim_call_t *call, int status, pq_sim_ekind_t kind, const char *message,
                       const char *param, const char *code);

/* Makes the call's answer a streamed one: 200, Content-Type text/event-stream, the events added
 * with pq_sim_call_stream_event sent one by one chunk_ms apart (the state's stream_* faults
 * applied). eol: the line end the events use ("\n", or "\r\n" as Gemini sends). Returns 0, or
 * -1 when out of memory (the call then answers 500). */
int pq_sim_call_stream(pq_sim_call_t *call, const char *eol);

/* Appends an SSE event to a streamed answer: an "event:" line when event is not NULL, and one
 * "data:" line with doc as compact JSON (doc: borrowed), or raw when doc is NULL. done: the
 * stream's end marker ([DONE], message_stop), which stream_no_done leaves out. Returns 0, or -1
 * when out of memory. */
int pq_sim_call_stream_event(pq_sim_call_t *call, const char *event, const json_t *doc,
                             const char *raw, int done);

/* 1 when the call's body asks for a streamed answer ("stream": true); doc: borrowed. */
int pq_sim_wants_stream(const json_t *doc);

/* Counts tokens of a successful answer into the stats. */
void pq_sim_call_tokens(pq_sim_call_t *call, int64_t tokens);

/* Next answer id number (1, 2, ...). */
uint64_t pq_sim_next_id(pq_sim_t *sim);

/* IAM tokens numbered below this were revoked (POST /_sim/state {"revoke_tokens": true}). */
uint64_t pq_sim_token_floor(const pq_sim_t *sim);

/* Wall clock seconds (cached per loop iteration). */
int64_t pq_sim_now_s(pq_sim_t *sim);

/* Records a model name for the models list (capped). */
void pq_sim_model_seen(pq_sim_t *sim, const char *model);

/* Borrowed: object whose keys are the models seen (always holds "sim-model"). */
const json_t *pq_sim_models(pq_sim_t *sim);

/* Creation time reported for models. */
int64_t pq_sim_started_s(pq_sim_t *sim);

pq_sim_t *pq_sim_call_sim(pq_sim_call_t *call);

/* Copies the value of query parameter name into buf; 0, or -1 when absent (or too long). */
int pq_sim_call_query(pq_sim_call_t *call, const char *name, char *buf, size_t size);

/* 1 if key is one of the --key values, or no --key was given; else 0. */
int pq_sim_key_valid(pq_sim_t *sim, const char *key);

/* Copies the request header name (case-insensitive) into buf; 0, or -1 if absent/too long. */
int pq_sim_call_header(pq_sim_call_t *call, const char *name, char *buf, size_t size);

/* 1 if the state the call runs under refuses an assistant prefill (reject_prefill). */
int pq_sim_call_rejects_prefill(const pq_sim_call_t *call);

/* ---- OpenAI-style chat bodies (sim_openai.c), shared by OpenAI-like formats ---- */

typedef struct {
    json_t *doc;       /* the parsed body (owned) */
    const char *model; /* borrowed from doc; NULL when absent and not required */
    char *text;        /* text of the last message (owned); the one before an assistant
                          prefill when the last message is the assistant's */
    size_t text_len;
    char *prefill; /* a trailing assistant message's text (owned), or NULL */
    size_t prefill_len;
    size_t prompt_bytes; /* text bytes of all messages (token estimate) */
    int64_t max_tokens;  /* max_completion_tokens or max_tokens; 0: none */
} pq_sim_prompt_t;

/* Validates an OpenAI chat body (Content-Type, JSON object, model, messages, max_tokens) and
 * fills p. require_model: 0 optional "model", 1 required "model", 2 required "model_id".
 * Returns 0, or -1 with the 400 answer set (p is then empty). */
int pq_sim_openai_parse(pq_sim_call_t *call, int require_model, pq_sim_prompt_t *p);

void pq_sim_prompt_free(pq_sim_prompt_t *p);

/* OpenAI's error document {"error":{message,type,param,code}} (also Azure's). */
void pq_sim_openai_error(pq_sim_call_t *call, int status, const pq_sim_error_t *err);

/* 1 if the request's Content-Type is application/json (parameters allowed). */
int pq_sim_json_content_type(struct evhttp_request *req);

/* Streams ans as OpenAI chat.completion.chunk events (pq_sim_call_stream): a role chunk, one
 * chunk per word, a chunk with the finish reason, then a usage chunk (choices []) when usage is
 * set, then [DONE] when done_marker is set. watsonx: chunks also carry model_id and the events
 * are named "message" (watsonx's text/chat_stream). Returns 0, or -1 when out of memory. */
int pq_sim_openai_stream(pq_sim_call_t *call, const char *id, const char *model, int watsonx,
                         const pq_sim_answer_t *ans, int64_t ptok, int64_t ctok, int usage,
                         int done_marker);

/* Sets a chat.completion answer for p, showing `model`; a stream of chat.completion.chunk
 * events when p's body has "stream": true (usage with stream_options.include_usage). */
void pq_sim_openai_reply(pq_sim_call_t *call, const char *model, const pq_sim_prompt_t *p);

/* ---- server (sim_server.c) ---- */

typedef struct {
    const char *listen;  /* HOST:PORT, required */
    const char *control; /* HOST:PORT or NULL */
    const char *name;
    const char *keys[PQ_SIM_MAX_API_KEYS];
    int nkeys;
} pq_sim_opts_t;

/* Binds the listeners and prints "listening=H:P control=H:P". NULL + errstr on failure.
 * opts: borrowed during the call only. */
pq_sim_t *pq_sim_new(struct event_base *base, const pq_sim_opts_t *opts, char *errstr,
                     size_t errstr_size);

/* Drops pending calls, closes listeners. NULL is a no-op. */
void pq_sim_destroy(pq_sim_t *sim);

#endif
