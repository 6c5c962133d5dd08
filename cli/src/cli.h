/* promptq, the command-line client: shared declarations of its modules (http.c, jobs.c, list.c,
 * batch.c, ops.c, main.c). Internal to the cli/ directory. */
#ifndef PROMPTQ_CLI_H
#define PROMPTQ_CLI_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <curl/curl.h>
#include <jansson.h>

/* Exit codes (DESIGN §7, the CLI's contract). */
#define PQ_CLI_EXIT_OK          0 /* done; the job(s) succeeded */
#define PQ_CLI_EXIT_FAILED      1 /* the job or the request failed (HTTP error, job failed) */
#define PQ_CLI_EXIT_USAGE       2 /* bad arguments or input files */
#define PQ_CLI_EXIT_UNREACHABLE 3 /* cannot reach the broker (connect, resolve, transport) */

#define PQ_CLI_DEFAULT_URL     "http://127.0.0.1:8080"
#define PQ_CLI_REQUEST_TIMEOUT 30000       /* ms per HTTP request when --timeout is absent */
#define PQ_CLI_MAX_BODY        (64u << 20) /* largest answer body we keep */
#define PQ_CLI_MAX_INPUT       (64u << 20) /* largest prompt / envelope read from a file */
#define PQ_CLI_POLL_MIN_MS     50          /* job polling backoff, first wait */
#define PQ_CLI_POLL_MAX_MS     1000        /* job polling backoff, cap */
#define PQ_CLI_UNREACHABLE_MS  30000       /* give up waiting after this long unreachable */

/* Global options and the reusable HTTP handle; one per process. */
typedef struct pq_cli_s {
    char url[1024];     /* broker base URL without a trailing slash */
    const char *key;    /* API key or NULL (key_own or the environment's); never printed */
    char *key_own;      /* --key's value (new); the argv copy is wiped so ps does not show it */
    int json;           /* --json: machine output */
    int64_t timeout_ms; /* --timeout: overall limit of the command; 0 = none */
    int64_t start_ms;   /* monotonic start of the command */
    CURL *easy;         /* lazily created, reused for keep-alive */
    char *auth;         /* "Authorization: Bearer KEY" (new), or NULL */
    int stdout_tty, stderr_tty;
} pq_cli_t;

/* One HTTP answer. status 0 means the request did not complete (see cerr/errbuf). */
typedef struct pq_cli_resp_s {
    long status;
    CURLcode cerr;
    char errbuf[CURL_ERROR_SIZE];
    char *body; /* NUL-terminated, owned; NULL when empty */
    size_t len, cap;
    int too_big;        /* the body exceeded PQ_CLI_MAX_BODY (truncated) */
    int retry_after_s;  /* Retry-After header in seconds, -1 if absent */
    char location[512]; /* Location header, "" if absent */
} pq_cli_resp_t;

/* ---- http.c ---- */

/* Fills c from the environment and defaults; returns 0. */
int pq_cli_init(pq_cli_t *c);

/* Frees what pq_cli_init and requests allocated. */
void pq_cli_term(pq_cli_t *c);

/* Sets the base URL (trailing slashes removed); returns -1 if it is not http(s)://... */
int pq_cli_set_url(pq_cli_t *c, const char *url);

/* Builds the Authorization header from c->key (call after options are parsed). */
int pq_cli_ready(pq_cli_t *c);

/* Remaining ms of the overall --timeout (INT64_MAX when none; 0 when passed). */
int64_t pq_cli_remaining_ms(const pq_cli_t *c);

/* Per-request timeout in ms: the remaining overall time, at most PQ_CLI_REQUEST_TIMEOUT unless
 * --timeout is larger. */
long pq_cli_request_timeout_ms(const pq_cli_t *c);

/* Applies the common options (URL base + path, headers, timeouts, body capture into r) to an easy
 * handle; the header list (new) is returned in *hdrs and must outlive the transfer.
 * extra_header may be NULL. body/len are borrowed until the transfer ends. */
int pq_cli_easy_setup(pq_cli_t *c, CURL *h, const char *method, const char *path, const char *body,
                      size_t len, const char *extra_header, struct curl_slist **hdrs,
                      pq_cli_resp_t *r);

/* One blocking request on the reusable handle. path starts with "/". body may be NULL.
 * Returns 0 when an HTTP answer arrived (any status), -1 when the broker could not be reached
 * (r->cerr, r->errbuf say why). */
int pq_cli_request(pq_cli_t *c, const char *method, const char *path, const char *body, size_t len,
                   const char *extra_header, pq_cli_resp_t *r);

/* Frees the body and resets r for reuse. */
void pq_cli_resp_reset(pq_cli_resp_t *r);

/* Parses r->body as JSON (new reference) or NULL. */
json_t *pq_cli_resp_json(const pq_cli_resp_t *r);

/* Prints "promptq: <status> <type>: <message>" for an HTTP error answer (or a transport error:
 * "promptq: cannot reach the broker at URL: ...") and returns the exit code to use. */
int pq_cli_report(const pq_cli_t *c, const char *what, const pq_cli_resp_t *r);

/* 1 when a curl error means the broker could not be reached at all. */
int pq_cli_is_unreachable(CURLcode cerr);

/* URL-escapes s into a new string (curl_free it), NULL on failure. */
char *pq_cli_escape(const char *s);

/* ---- polling a job (wait_job and watch in jobs.c, batch.c) ---- */

/* Keeps the clock of a broker that does not answer: *since is 0 while it answers (the caller
 * resets it on every HTTP answer). On a transport failure, starts the clock (*since = now) and
 * returns 0, or returns 1 once it has been unreachable for more than PQ_CLI_UNREACHABLE_MS
 * (time to give up). */
int pq_cli_unreachable_expired(int64_t *since);

/* The wait before the next poll after a busy answer (429, 5xx): delay, or the answer's
 * Retry-After when that is longer (at most 5 s). */
int64_t pq_cli_retry_after_ms(const pq_cli_resp_t *r, int64_t delay);

/* The next poll backoff: delay doubled, at most cap. */
int64_t pq_cli_backoff_next(int64_t delay, int64_t cap);

/* Prints "promptq: " + message to stderr. */
void pq_cli_errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- jobs.c ---- */

/* Sleeps ms milliseconds (through EINTR); no-op for ms <= 0. */
void pq_cli_sleep_ms(int64_t ms);

int pq_cli_cmd_submit(pq_cli_t *c, int argc, char **argv);
int pq_cli_cmd_get(pq_cli_t *c, int argc, char **argv);
int pq_cli_cmd_watch(pq_cli_t *c, int argc, char **argv);
int pq_cli_cmd_cancel(pq_cli_t *c, int argc, char **argv);

/* 1 for succeeded, failed, expired, cancelled. */
int pq_cli_status_terminal(const char *status);

/* Exit code for a terminal status: 0 for succeeded, 1 otherwise. */
int pq_cli_status_exit(const char *status);

/* Builds the envelope for a prompt (or a chat body / envelope given as JSON) with an optional
 * default model. line is the text, kind reports what it was. Returns a new object or NULL with
 * errstr. Pure. */
json_t *pq_cli_envelope_from_line(const char *line, size_t len, const char *model, char *errstr,
                                  size_t errstr_size);

/* ---- list.c ---- */

/* promptq list: GET /v1/jobs, one line per job (or each page as JSON); --all follows has_more. */
int pq_cli_cmd_list(pq_cli_t *c, int argc, char **argv);

/* ---- batch.c ---- */

int pq_cli_cmd_batch(pq_cli_t *c, int argc, char **argv);

/* ---- ops.c ---- */

int pq_cli_cmd_health(pq_cli_t *c, int argc, char **argv);
int pq_cli_cmd_parked(pq_cli_t *c, int argc, char **argv);
int pq_cli_cmd_dlq(pq_cli_t *c, int argc, char **argv);
int pq_cli_cmd_models(pq_cli_t *c, int argc, char **argv);

/* Prints a JSON value as indented "key: value" lines (readable summary). */
void pq_cli_print_tree(FILE *out, const json_t *v, int indent);

/* ---- main.c: option parsing shared by the commands ---- */

/* Parses the global options that may appear among a command's arguments. Returns 1 when
 * argv[*i] (and possibly its value, advancing *i) was one, 0 when not, -1 on a usage error
 * (printed). */
int pq_cli_global_opt(pq_cli_t *c, int argc, char **argv, int *i);

/* Returns the value of option argv[*i] ("--opt VALUE" or "--opt=VALUE") advancing *i, or NULL
 * after printing a usage error. name is the option without its value. */
const char *pq_cli_opt_value(int argc, char **argv, int *i, const char *name);

/* 1 when argv[i] is "--name" or "--name=..." */
int pq_cli_opt_is(const char *arg, const char *name);

/* What pq_cli_arg_next found at argv[*i]. */
enum {
    PQ_CLI_ARG_STOP, /* --help was printed (*rc = PQ_CLI_EXIT_OK) or a usage error (*rc =
                        PQ_CLI_EXIT_USAGE): the command returns *rc */
    PQ_CLI_ARG_DONE, /* "--" or a global option, handled (*i may have moved past its value) */
    PQ_CLI_ARG_POS,  /* a positional argument: not an option, "-" alone, or anything after "--" */
    PQ_CLI_ARG_OPT,  /* an option of the command's own, for the caller to parse */
};

/* One step of a command's argument loop (for (i = 1; i < argc; i++)): classifies argv[*i].
 * only_pos: the loop's state, 0 at first (set by "--"). help: the command's help text, printed
 * to stdout on -h/--help. *rc is set only with PQ_CLI_ARG_STOP. */
int pq_cli_arg_next(pq_cli_t *c, int argc, char **argv, int *i, int *only_pos, const char *help,
                    int *rc);

/* Parses "COMMAND [options] ARG..." for commands whose own options are at most --yes/-y: stores
 * up to max positional arguments in pos (borrowed from argv). yes: set when --yes is given (NULL:
 * the command has no --yes). Returns the count; max + 1 as soon as one more comes (nothing
 * printed: the caller says why, *rc = PQ_CLI_EXIT_USAGE); or -1 with *rc set (help printed, or a
 * usage error printed). */
int pq_cli_parse_args(pq_cli_t *c, int argc, char **argv, const char *help, const char **pos,
                      int max, int *yes, int *rc);

#endif
