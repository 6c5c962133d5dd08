/* Single-job commands: submit (optionally waiting), get, watch, cancel; and the envelope
 * builder shared with batch. Waiting polls GET /v1/jobs/{id} with backoff (50 ms .. 1 s). */
#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "promptq/util.h"

static const char submit_help[] =
    "usage: promptq submit [--model ROUTE] [--id ID] [--metadata JSON] [--deadline RFC3339]\n"
    "                      [--wait] PROMPT|-\n"
    "       promptq submit --file ENVELOPE.json|- [--wait]\n"
    "\n"
    "Submits one job (POST /v1/jobs). PROMPT \"-\" reads the prompt from stdin (trailing newlines\n"
    "are dropped); --file sends a job envelope (or chat body) as is. Prints the job id on stdout\n"
    "and its durability on stderr; with --json, the broker's answer.\n"
    "\n"
    "  --model ROUTE      route (model name) to use (else $PROMPTQ_MODEL)\n"
    "  --id ID            client-chosen job id ([A-Za-z0-9._:-]{1,128})\n"
    "  --metadata JSON    a JSON object echoed in the result\n"
    "  --deadline TIME    RFC 3339 time after which the job expires\n"
    "  --wait             wait for the job to finish and print its answer (or its error);\n"
    "                     exit 1 if it did not succeed\n";

static const char get_help[] =
    "usage: promptq get ID\n"
    "\n"
    "Shows a job (GET /v1/jobs/ID): a short summary, or with --json the record as JSON.\n"
    "Exit 1 when the job failed, expired or was cancelled, or the request failed.\n";

static const char watch_help[] =
    "usage: promptq watch ID...\n"
    "\n"
    "Follows jobs until each is terminal, printing a line per status change (with --json, the\n"
    "record as one JSON line). Exit 1 if any job did not succeed.\n";

static const char cancel_help[] = "usage: promptq cancel ID\n"
                                  "\n"
                                  "Cancels a job that has not run yet (DELETE /v1/jobs/ID).\n";

int pq_cli_status_terminal(const char *status)
{
    return status && (!strcmp(status, "succeeded") || !strcmp(status, "failed") ||
                      !strcmp(status, "expired") || !strcmp(status, "cancelled"));
}

int pq_cli_status_exit(const char *status)
{
    return status && !strcmp(status, "succeeded") ? PQ_CLI_EXIT_OK : PQ_CLI_EXIT_FAILED;
}

void pq_cli_sleep_ms(int64_t ms)
{
    struct timespec ts;

    if (ms <= 0)
        return;
    ts.tv_sec = (time_t)(ms / 1000);
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

/* Reads all of fp into a new buffer (at most PQ_CLI_MAX_INPUT bytes); NULL on error. */
static char *read_all(FILE *fp, size_t *len)
{
    size_t cap = 4096, n = 0, got;
    char *buf = malloc(cap), *nb;

    if (!buf)
        return NULL;
    while ((got = fread(buf + n, 1, cap - n - 1, fp)) > 0) {
        n += got;
        if (n + 1 == cap) {
            if (cap >= PQ_CLI_MAX_INPUT) {
                errno = EFBIG;
                goto out_fail;
            }
            nb = realloc(buf, cap * 2);
            if (!nb)
                goto out_fail;
            buf = nb;
            cap *= 2;
        }
    }
    if (ferror(fp))
        goto out_fail;
    buf[n] = '\0';
    *len = n;
    return buf;
out_fail:
    free(buf);
    return NULL;
}

static json_t *prompt_envelope(const char *prompt, size_t len, const char *model)
{
    return json_pack("{s:{s:s,s:[{s:s,s:s%}]}}", "request", "model", model, "messages", "role",
                     "user", "content", prompt, len);
}

json_t *pq_cli_envelope_from_line(const char *line, size_t len, const char *model, char *errstr,
                                  size_t errstr_size)
{
    json_t *doc, *env = NULL, *req;

    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
        len--;
    doc = json_loadb(line, len, JSON_DECODE_ANY, NULL);
    if (!doc || json_is_string(doc)) {
        const char *p = doc ? json_string_value(doc) : line;
        size_t plen = doc ? json_string_length(doc) : len;

        if (!model) {
            snprintf(errstr, errstr_size, "a prompt needs a route: pass --model ROUTE");
            goto out;
        }
        env = prompt_envelope(p, plen, model);
        if (!env)
            snprintf(errstr, errstr_size, "the prompt is not valid UTF-8");
        goto out;
    }
    if (!json_is_object(doc)) {
        snprintf(errstr, errstr_size,
                 "expected a prompt, a chat body or a job envelope, got a JSON %s",
                 json_is_array(doc) ? "array" : "scalar");
        goto out;
    }
    if (json_is_object(json_object_get(doc, "request"))) {
        env = json_incref(doc); /* an envelope */
    } else if (json_is_object(json_object_get(doc, "body")) && json_object_get(doc, "custom_id")) {
        /* an OpenAI Batch API input line: the body is the request, custom_id goes to metadata */
        env = json_pack("{s:O,s:{s:O}}", "request", json_object_get(doc, "body"), "metadata",
                        "custom_id", json_object_get(doc, "custom_id"));
    } else if (json_object_get(doc, "messages")) {
        env = json_pack("{s:O}", "request", doc); /* a chat-completions body */
    } else {
        snprintf(errstr, errstr_size,
                 "a JSON object must be a job envelope (\"request\") or a chat body "
                 "(\"messages\")");
        goto out;
    }
    if (!env) {
        snprintf(errstr, errstr_size, "out of memory");
        goto out;
    }
    req = json_object_get(env, "request");
    if (!json_object_get(req, "model")) {
        if (!model) {
            snprintf(errstr, errstr_size, "request has no model: pass --model ROUTE");
            json_decref(env);
            env = NULL;
            goto out;
        }
        /* req belongs to doc or env, both ours */
        if (json_object_set_new(req, "model", json_string(model))) {
            snprintf(errstr, errstr_size, "out of memory");
            json_decref(env);
            env = NULL;
        }
    }
out:
    json_decref(doc);
    return env;
}

/* "Idempotency-Key: cli-<32 hex>" into buf (at least 64 bytes). */
static void idempotency_header(char *buf, size_t size)
{
    unsigned char rnd[16];
    char hex[33];

    if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
        int64_t t = pq_now_ms() ^ ((int64_t)getpid() << 32);

        memcpy(rnd, &t, sizeof(t));
        t = pq_mono_ms();
        memcpy(rnd + 8, &t, sizeof(t));
    }
    for (size_t i = 0; i < sizeof(rnd); i++)
        snprintf(hex + 2 * i, 3, "%02x", rnd[i]);
    snprintf(buf, size, "Idempotency-Key: cli-%s", hex);
}

/* GET /v1/jobs/{id} into r. Returns 0 with an HTTP answer, -1 when unreachable. */
static int get_job(pq_cli_t *c, const char *id, pq_cli_resp_t *r)
{
    char path[512];
    char *esc = pq_cli_escape(id);
    int rc;

    if (!esc) {
        pq_cli_resp_reset(r);
        r->cerr = CURLE_OUT_OF_MEMORY;
        return -1;
    }
    snprintf(path, sizeof(path), "/v1/jobs/%s", esc);
    curl_free(esc);
    rc = pq_cli_request(c, "GET", path, NULL, 0, NULL, r);
    return rc;
}

static const char *str_field(const json_t *o, const char *k)
{
    return json_string_value(json_object_get(o, k));
}

/* Text of the first choice's message, or NULL. */
static const char *answer_content(const json_t *rec, size_t *len)
{
    const json_t *ch =
        json_array_get(json_object_get(json_object_get(rec, "response"), "choices"), 0);
    const json_t *content = json_object_get(json_object_get(ch, "message"), "content");

    if (!json_is_string(content))
        return NULL;
    *len = json_string_length(content);
    return json_string_value(content);
}

/* "type: message (provider NAME, HTTP N)" of a record's error into buf. */
static void error_text(const json_t *rec, char *buf, size_t size)
{
    const json_t *e = json_object_get(rec, "error");
    const char *type = str_field(e, "type"), *msg = str_field(e, "message");
    const char *prov = str_field(e, "provider");
    json_int_t st = json_integer_value(json_object_get(e, "status"));
    size_t n;

    if (json_is_string(e)) {
        snprintf(buf, size, "%s", json_string_value(e));
        return;
    }
    n = (size_t)snprintf(buf, size, "%s: %s", type ? type : "error", msg ? msg : "(no message)");
    if (n < size && st)
        snprintf(buf + n, size - n, " (%s%s%sHTTP %" JSON_INTEGER_FORMAT ")",
                 prov ? "provider " : "", prov ? prov : "", prov ? ", " : "", st);
    else if (n < size && prov)
        snprintf(buf + n, size - n, " (provider %s)", prov);
    for (char *p = buf; *p; p++)
        if ((unsigned char)*p < 0x20)
            *p = ' ';
}

/* Prints a terminal record per --wait rules; returns the exit code. */
static int print_outcome(pq_cli_t *c, const json_t *rec)
{
    const char *status = str_field(rec, "status"), *id = str_field(rec, "id");
    const char *content;
    size_t len = 0;
    char err[1024];

    if (c->json) {
        json_dumpf(rec, stdout, JSON_COMPACT);
        fputc('\n', stdout);
        return pq_cli_status_exit(status);
    }
    if (status && !strcmp(status, "succeeded")) {
        content = answer_content(rec, &len);
        if (content) {
            fwrite(content, 1, len, stdout);
            if (!len || content[len - 1] != '\n')
                fputc('\n', stdout);
        } else {
            /* no text (tool calls, or a record without a response): show the message */
            const json_t *msg = json_object_get(
                json_array_get(json_object_get(json_object_get(rec, "response"), "choices"), 0),
                "message");

            if (msg)
                json_dumpf(msg, stdout, JSON_INDENT(2));
            else
                fputs("(no response stored)", stdout);
            fputc('\n', stdout);
        }
        return PQ_CLI_EXIT_OK;
    }
    error_text(rec, err, sizeof(err));
    pq_cli_errorf("job %s %s: %s", id ? id : "?", status ? status : "?",
                  json_object_get(rec, "error") ? err : "(no error recorded)");
    return PQ_CLI_EXIT_FAILED;
}

/* Polls one job until it is terminal. fresh: we just submitted it, so a 404 means "not
 * written yet" rather than "unknown". Returns the exit code; prints the outcome. */
static int wait_job(pq_cli_t *c, const char *id, int fresh)
{
    pq_cli_resp_t r = {0};
    int64_t delay = PQ_CLI_POLL_MIN_MS, unreachable_since = 0;
    char last[32] = "";
    int rc = PQ_CLI_EXIT_FAILED;

    pq_cli_resp_reset(&r);
    for (;;) {
        int64_t left;
        json_t *rec;
        const char *status;

        if (get_job(c, id, &r)) {
            if (!pq_cli_is_unreachable(r.cerr)) {
                rc = pq_cli_report(c, "GET /v1/jobs/{id}", &r);
                goto out;
            }
            if (pq_cli_unreachable_expired(&unreachable_since)) {
                rc = pq_cli_report(c, NULL, &r);
                goto out;
            }
        } else if (r.status == 200) {
            unreachable_since = 0;
            rec = pq_cli_resp_json(&r);
            status = str_field(rec, "status");
            if (!rec || !status) {
                pq_cli_errorf("GET /v1/jobs/%s: the broker answered a record without status", id);
                json_decref(rec);
                goto out;
            }
            if (pq_cli_status_terminal(status)) {
                rc = print_outcome(c, rec);
                json_decref(rec);
                goto out;
            }
            if (strcmp(last, status)) {
                if (!c->json && c->stderr_tty)
                    fprintf(stderr, "promptq: %s %s\n", id, status);
                delay = PQ_CLI_POLL_MIN_MS; /* it moves: look again soon */
            }
            pq_strlcpy(last, status, sizeof(last));
            json_decref(rec);
        } else if (r.status == 404 && fresh) {
            unreachable_since = 0; /* the queued record is written best effort: keep asking */
        } else if (r.status == 503 || r.status == 429 || r.status == 502 || r.status == 504) {
            unreachable_since = 0;
            delay = pq_cli_retry_after_ms(&r, delay);
        } else {
            rc = pq_cli_report(c, "GET /v1/jobs/{id}", &r);
            goto out;
        }
        left = pq_cli_remaining_ms(c);
        if (left <= 0) {
            pq_cli_errorf("timed out waiting for job %s (last status: %s)", id,
                          last[0] ? last : "unknown");
            rc = PQ_CLI_EXIT_FAILED;
            goto out;
        }
        pq_cli_sleep_ms(delay < left ? delay : left);
        delay = pq_cli_backoff_next(delay, PQ_CLI_POLL_MAX_MS);
    }
out:
    pq_cli_resp_reset(&r);
    return rc;
}

int pq_cli_cmd_submit(pq_cli_t *c, int argc, char **argv)
{
    const char *model = getenv("PROMPTQ_MODEL"), *id = NULL, *metadata = NULL;
    const char *deadline = NULL, *file = NULL, *prompt_arg = NULL, *v;
    int wait = 0, npos = 0, only_pos = 0, rc = PQ_CLI_EXIT_USAGE, attempts = 0;
    char *input = NULL, *body = NULL, idem[96], errstr[256];
    size_t input_len = 0;
    json_t *env = NULL, *ans = NULL;
    pq_cli_resp_t r = {0};

    pq_cli_resp_reset(&r);
    if (model && !*model)
        model = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int k = pq_cli_arg_next(c, argc, argv, &i, &only_pos, submit_help, &rc);

        if (k == PQ_CLI_ARG_STOP)
            goto out;
        if (k == PQ_CLI_ARG_DONE)
            continue;
        if (k == PQ_CLI_ARG_POS) {
            prompt_arg = a;
            npos++;
            continue;
        }
        if (!strcmp(a, "--wait")) {
            wait = 1;
            continue;
        }
#define OPT(name, var)                                                                             \
    if (pq_cli_opt_is(a, name)) {                                                                  \
        if (!(v = pq_cli_opt_value(argc, argv, &i, name)))                                         \
            goto out;                                                                              \
        var = v;                                                                                   \
        continue;                                                                                  \
    }
        OPT("--model", model)
        OPT("--id", id)
        OPT("--metadata", metadata)
        OPT("--deadline", deadline)
        OPT("--file", file)
#undef OPT
        pq_cli_errorf("submit: unknown option %.100s (see promptq submit --help)", a);
        goto out;
    }
    if (file && (npos || id || metadata || deadline)) {
        pq_cli_errorf("submit: --file sends the envelope as is; it takes no PROMPT, --id, "
                      "--metadata or --deadline");
        goto out;
    }
    if (!file && npos != 1) {
        pq_cli_errorf("submit: expected one PROMPT (or - for stdin, or --file); see --help");
        goto out;
    }
    if (file) {
        FILE *fp = strcmp(file, "-") ? fopen(file, "rb") : stdin;

        if (!fp) {
            pq_cli_errorf("submit: %s: %s", file, strerror(errno));
            goto out;
        }
        body = read_all(fp, &input_len);
        if (fp != stdin)
            fclose(fp);
        if (!body) {
            pq_cli_errorf("submit: %s: %s", file, strerror(errno));
            goto out;
        }
    } else {
        if (!model) {
            pq_cli_errorf("submit: no route: pass --model ROUTE (or set $PROMPTQ_MODEL)");
            goto out;
        }
        if (!strcmp(prompt_arg, "-")) {
            input = read_all(stdin, &input_len);
            if (!input) {
                pq_cli_errorf("submit: reading stdin: %s", strerror(errno));
                goto out;
            }
            while (input_len > 0 && (input[input_len - 1] == '\n' || input[input_len - 1] == '\r'))
                input_len--;
        }
        env = prompt_envelope(input ? input : prompt_arg, input ? input_len : strlen(prompt_arg),
                              model);
        if (!env) {
            pq_cli_errorf("submit: the prompt is not valid UTF-8");
            goto out;
        }
        if (id && json_object_set_new(env, "id", json_string(id)))
            goto out;
        if (metadata) {
            json_error_t jerr;
            json_t *m = json_loads(metadata, 0, &jerr);

            if (!json_is_object(m)) {
                pq_cli_errorf("submit: --metadata must be a JSON object%s%s", m ? "" : ": ",
                              m ? "" : jerr.text);
                json_decref(m);
                goto out;
            }
            json_object_set_new(env, "metadata", m);
        }
        if (deadline) {
            int64_t ms;

            if (pq_time_parse(deadline, &ms)) {
                pq_cli_errorf("submit: --deadline: not an RFC 3339 time: %.100s", deadline);
                goto out;
            }
            json_object_set_new(env, "deadline", json_string(deadline));
        }
        body = json_dumps(env, JSON_COMPACT);
        if (!body)
            goto out;
        input_len = strlen(body);
    }
    if (pq_cli_ready(c))
        goto out;

    idempotency_header(idem, sizeof(idem));
    for (;;) {
        int64_t left, pause;

        attempts++;
        if (pq_cli_request(c, "POST", "/v1/jobs", body, input_len, idem, &r)) {
            rc = pq_cli_report(c, NULL, &r);
            goto out;
        }
        if (r.status == 202 || r.status == 200 || r.status == 201)
            break;
        /* not durable now / too many requests: the broker says when to come back */
        left = pq_cli_remaining_ms(c);
        pause = r.retry_after_s >= 0 ? r.retry_after_s * 1000 : 500;
        if ((r.status != 503 && r.status != 429) || attempts >= 5 || pause > 10000 ||
            pause >= left) {
            rc = pq_cli_report(c, "POST /v1/jobs", &r);
            goto out;
        }
        if (c->stderr_tty)
            fprintf(stderr, "promptq: %ld from the broker, retrying in %.1f s\n", r.status,
                    (double)pause / 1000.0);
        pq_cli_sleep_ms(pause);
    }
    ans = pq_cli_resp_json(&r);
    id = str_field(ans, "id");
    if (!id) {
        pq_cli_errorf("submit: the broker answered %ld without a job id", r.status);
        rc = PQ_CLI_EXIT_FAILED;
        goto out;
    }
    if (!wait) {
        if (c->json) {
            json_dumpf(ans, stdout, JSON_COMPACT);
            fputc('\n', stdout);
        } else {
            const char *dur = str_field(ans, "durability");

            printf("%s\n", id);
            fflush(stdout);
            fprintf(stderr, "promptq: queued %s (durability: %s)\n", id, dur ? dur : "unknown");
        }
        rc = PQ_CLI_EXIT_OK;
        goto out;
    }
    if (!c->json && c->stderr_tty)
        fprintf(stderr, "promptq: queued %s, waiting\n", id);
    rc = wait_job(c, id, 1);
out:
    (void)errstr;
    json_decref(ans);
    json_decref(env);
    pq_cli_resp_reset(&r);
    free(input);
    free(body);
    return rc;
}

/* Parses "COMMAND [options] ID..." for get/watch/cancel; returns the number of ids (stored in
 * ids, borrowed from argv) or -1 with *rc set. */
static int parse_ids(pq_cli_t *c, int argc, char **argv, const char *help, const char **ids,
                     int max, int *rc)
{
    int n = pq_cli_parse_args(c, argc, argv, help, ids, max, NULL, rc);

    if (n < 0)
        return -1;
    if (n > max) {
        pq_cli_errorf("%s: at most %d ids", argv[0], max);
        return -1;
    }
    if (!n) {
        pq_cli_errorf("%s: expected a job id (see promptq %s --help)", argv[0], argv[0]);
        return -1;
    }
    if (pq_cli_ready(c))
        return -1;
    return n;
}

static void print_kv(const char *k, const char *v)
{
    if (v)
        printf("%-10s %s\n", k, v);
}

static void print_summary(const json_t *rec)
{
    const char *status = str_field(rec, "status"), *content;
    const json_t *v;
    size_t len = 0;
    char buf[1024];

    print_kv("id:", str_field(rec, "id"));
    print_kv("status:", status);
    if (str_field(rec, "tenant") && strcmp(str_field(rec, "tenant"), "default"))
        print_kv("tenant:", str_field(rec, "tenant"));
    print_kv("route:", str_field(rec, "route"));
    if (str_field(rec, "provider")) {
        snprintf(buf, sizeof(buf), "%s%s%s", str_field(rec, "provider"),
                 str_field(rec, "model") ? " / " : "",
                 str_field(rec, "model") ? str_field(rec, "model") : "");
        print_kv("provider:", buf);
    }
    if (json_is_integer(v = json_object_get(rec, "attempts")))
        printf("%-10s %" JSON_INTEGER_FORMAT "\n", "attempts:", json_integer_value(v));
    if (json_is_integer(v = json_object_get(rec, "latency_ms")))
        printf("%-10s %" JSON_INTEGER_FORMAT " ms\n", "latency:", json_integer_value(v));
    print_kv("created:", str_field(rec, "created_at"));
    print_kv("updated:", str_field(rec, "updated_at"));
    print_kv("completed:", str_field(rec, "completed_at"));
    if ((content = answer_content(rec, &len))) {
        size_t n = len > 300 ? 300 : len, o = 0;

        for (size_t i = 0; i < n && o + 4 < sizeof(buf); i++)
            buf[o++] = (unsigned char)content[i] < 0x20 ? ' ' : content[i];
        if (n < len) {
            memcpy(buf + o, "...", 3);
            o += 3;
        }
        buf[o] = '\0';
        print_kv("answer:", buf);
    }
    if (json_object_get(rec, "error")) {
        error_text(rec, buf, sizeof(buf));
        print_kv("error:", buf);
    }
    if (json_is_object(v = json_object_get(rec, "metadata")) && json_object_size(v)) {
        char *m = json_dumps(v, JSON_COMPACT);

        print_kv("metadata:", m);
        free(m);
    }
}

int pq_cli_cmd_get(pq_cli_t *c, int argc, char **argv)
{
    const char *ids[1];
    int rc, n = parse_ids(c, argc, argv, get_help, ids, 1, &rc);
    pq_cli_resp_t r = {0};
    json_t *rec = NULL;
    const char *status;

    if (n < 0)
        return rc;
    pq_cli_resp_reset(&r);
    if (get_job(c, ids[0], &r) || r.status != 200) {
        rc = pq_cli_report(c, "GET /v1/jobs/{id}", &r);
        goto out;
    }
    rec = pq_cli_resp_json(&r);
    if (!json_is_object(rec)) {
        pq_cli_errorf("GET /v1/jobs/%s: the broker answered something that is not a JSON object",
                      ids[0]);
        rc = PQ_CLI_EXIT_FAILED;
        goto out;
    }
    if (c->json) {
        json_dumpf(rec, stdout, JSON_INDENT(2));
        fputc('\n', stdout);
    } else {
        print_summary(rec);
    }
    status = str_field(rec, "status");
    rc = pq_cli_status_terminal(status) ? pq_cli_status_exit(status) : PQ_CLI_EXIT_OK;
out:
    json_decref(rec);
    pq_cli_resp_reset(&r);
    return rc;
}

#define WATCH_MAX 1024

typedef struct {
    const char *id;
    char status[24];
    int done, rc;
    int64_t due, delay;
} watch_job_t;

int pq_cli_cmd_watch(pq_cli_t *c, int argc, char **argv)
{
    const char *ids[WATCH_MAX];
    int rc, n = parse_ids(c, argc, argv, watch_help, ids, WATCH_MAX, &rc), left;
    watch_job_t *jobs;
    pq_cli_resp_t r = {0};
    int64_t unreachable_since = 0;

    if (n < 0)
        return rc;
    jobs = calloc((size_t)n, sizeof(*jobs));
    if (!jobs)
        return PQ_CLI_EXIT_FAILED;
    pq_cli_resp_reset(&r);
    for (int i = 0; i < n; i++) {
        jobs[i].id = ids[i];
        jobs[i].delay = PQ_CLI_POLL_MIN_MS;
    }
    rc = PQ_CLI_EXIT_OK;
    left = n;
    while (left > 0) {
        int64_t now = pq_mono_ms(), next = INT64_MAX, remaining;

        for (int i = 0; i < n; i++) {
            watch_job_t *j = &jobs[i];
            json_t *rec;
            const char *status;

            if (j->done)
                continue;
            if (j->due > now) {
                if (j->due < next)
                    next = j->due;
                continue;
            }
            if (get_job(c, j->id, &r)) {
                if (!pq_cli_is_unreachable(r.cerr) ||
                    pq_cli_unreachable_expired(&unreachable_since)) {
                    rc = pq_cli_report(c, NULL, &r);
                    goto out;
                }
            } else if (r.status == 200) {
                unreachable_since = 0;
                rec = pq_cli_resp_json(&r);
                status = str_field(rec, "status");
                if (status && strcmp(status, j->status)) {
                    pq_strlcpy(j->status, status, sizeof(j->status));
                    if (c->json) {
                        json_dumpf(rec, stdout, JSON_COMPACT);
                        fputc('\n', stdout);
                    } else {
                        char ts[40], err[1024] = "";

                        pq_time_format(pq_now_ms(), ts, sizeof(ts));
                        if (json_object_get(rec, "error"))
                            error_text(rec, err, sizeof(err));
                        printf("%s %s %s%s%s\n", ts, j->id, status, err[0] ? ": " : "", err);
                    }
                    fflush(stdout);
                    j->delay = PQ_CLI_POLL_MIN_MS; /* things move: look again soon */
                }
                if (pq_cli_status_terminal(status)) {
                    j->done = 1;
                    left--;
                    if (pq_cli_status_exit(status))
                        rc = PQ_CLI_EXIT_FAILED;
                }
                json_decref(rec);
            } else if (r.status == 503 || r.status == 429 || r.status == 502 || r.status == 504) {
                unreachable_since = 0;
            } else {
                /* 404 (unknown id), 401, ...: this id cannot be watched */
                char what[300];

                snprintf(what, sizeof(what), "GET /v1/jobs/%s", j->id);
                pq_cli_report(c, what, &r);
                j->done = 1;
                left--;
                rc = PQ_CLI_EXIT_FAILED;
                if (r.status == 401 || r.status == 403)
                    goto out;
            }
            if (!j->done) {
                j->due = pq_mono_ms() + j->delay;
                j->delay = pq_cli_backoff_next(j->delay, PQ_CLI_POLL_MAX_MS);
                if (j->due < next)
                    next = j->due;
            }
        }
        if (!left)
            break;
        remaining = pq_cli_remaining_ms(c);
        if (remaining <= 0) {
            pq_cli_errorf("timed out with %d job(s) not terminal", left);
            rc = PQ_CLI_EXIT_FAILED;
            break;
        }
        now = pq_mono_ms();
        if (next > now)
            pq_cli_sleep_ms(next - now < remaining ? next - now : remaining);
    }
out:
    free(jobs);
    pq_cli_resp_reset(&r);
    return rc;
}

int pq_cli_cmd_cancel(pq_cli_t *c, int argc, char **argv)
{
    const char *ids[1];
    int rc, n = parse_ids(c, argc, argv, cancel_help, ids, 1, &rc);
    pq_cli_resp_t r = {0};
    char path[512];
    char *esc;

    if (n < 0)
        return rc;
    pq_cli_resp_reset(&r);
    esc = pq_cli_escape(ids[0]);
    if (!esc)
        return PQ_CLI_EXIT_FAILED;
    snprintf(path, sizeof(path), "/v1/jobs/%s", esc);
    curl_free(esc);
    if (pq_cli_request(c, "DELETE", path, NULL, 0, NULL, &r) || r.status / 100 != 2) {
        rc = pq_cli_report(c, "DELETE /v1/jobs/{id}", &r);
        goto out;
    }
    if (c->json && r.body)
        printf("%s\n", r.body);
    else if (!c->json)
        printf("%s cancelled\n", ids[0]);
    rc = PQ_CLI_EXIT_OK;
out:
    pq_cli_resp_reset(&r);
    return rc;
}
