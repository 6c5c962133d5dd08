/* promptq batch FILE.jsonl: submits every line as a job over N concurrent keep-alive connections
 * (one libcurl multi handle, N reusable easy handles, no threads), then polls the jobs until
 * each is terminal, with a progress bar on stderr. Submissions go first; while some are left,
 * polls may use a quarter of the connections. */
#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "promptq/util.h"

static const char batch_help[] =
    "usage: promptq batch FILE.jsonl|- [--model ROUTE] [--concurrency N] [--no-wait]\n"
    "\n"
    "Submits each non-blank line as a job (POST /v1/jobs), then waits until all are terminal.\n"
    "A line is a prompt (a JSON string, or plain text), a chat-completions body (\"messages\"),\n"
    "a job envelope (\"request\") or an OpenAI Batch API line (\"custom_id\", \"body\").\n"
    "Progress goes to stderr (a bar on a terminal, periodic lines otherwise); a summary to\n"
    "stdout, or with --json one {\"line\",\"id\",\"status\"} object per job. Exit 1 if any job\n"
    "was refused or did not succeed.\n"
    "\n"
    "  --model ROUTE      route for lines that name none (else $PROMPTQ_MODEL)\n"
    "  --concurrency N    connections to the broker (default 16, at most 1024)\n"
    "  --no-wait          only submit; print the ids\n";

#define BATCH_MAX_LINES    10000000
#define BATCH_MAX_REPORTS  10
#define BATCH_SUBMIT_TRIES 8

enum { J_NEW, J_SUBMIT_WAIT, J_POLL_WAIT, J_INFLIGHT, J_DONE };

/* A job's last known status; the terminal ones are counted in the summary. */
enum {
    S_NONE,
    S_QUEUED,
    S_RUNNING,
    S_PARKED,
    S_SUCCEEDED,
    S_FAILED,
    S_EXPIRED,
    S_CANCELLED,
    S_REJECTED, /* the broker refused the submission */
    S_LOST,     /* could not submit or follow (unreachable, unexpected answers) */
    S__N
};

static const char *status_names[S__N] = {"unknown", "queued",  "running",   "parked",   "succeeded",
                                         "failed",  "expired", "cancelled", "rejected", "unknown"};

typedef struct {
    char *body; /* compact envelope until accepted (new) */
    size_t len;
    char *id;    /* job id from the 202 answer (new) */
    char *error; /* why it failed, when it did (new) */
    int line;
    unsigned char state, status, tries;
    int delay_ms;
} bjob_t;

typedef struct {
    int64_t due;
    int job;
} heap_item_t;

typedef struct {
    heap_item_t *v;
    size_t n, cap;
} heap_t;

typedef struct {
    CURL *h;
    struct curl_slist *hdrs;
    pq_cli_resp_t r;
    int job; /* -1 when free */
    int poll;
} slot_t;

typedef struct {
    pq_cli_t *c;
    bjob_t *jobs;
    size_t njobs, next_new;
    heap_t resubmit, polls;
    slot_t *slots;
    int nslots, inflight, inflight_polls;
    CURLM *multi;
    int wait;
    char run_id[20];
    size_t counts[S__N];
    size_t submitted, terminal, reports;
    int64_t t0, last_progress, unreachable_since;
    int any_answer, abort_rc, bar_drawn;
} batch_t;

static int heap_push(heap_t *h, int64_t due, int job)
{
    size_t i;

    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 256;
        heap_item_t *v = realloc(h->v, cap * sizeof(*v));

        if (!v)
            return -1;
        h->v = v;
        h->cap = cap;
    }
    i = h->n++;
    while (i > 0 && h->v[(i - 1) / 2].due > due) {
        h->v[i] = h->v[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->v[i].due = due;
    h->v[i].job = job;
    return 0;
}

static heap_item_t heap_pop(heap_t *h)
{
    heap_item_t top = h->v[0], last = h->v[--h->n];
    size_t i = 0;

    for (;;) {
        size_t l = 2 * i + 1, m = i;

        if (l < h->n && h->v[l].due < last.due)
            m = l;
        if (l + 1 < h->n && h->v[l + 1].due < (m == i ? last.due : h->v[m].due))
            m = l + 1;
        if (m == i)
            break;
        h->v[i] = h->v[m];
        i = m;
    }
    if (h->n)
        h->v[i] = last;
    return top;
}

static int status_of(const char *s)
{
    for (int i = S_QUEUED; i <= S_CANCELLED; i++)
        if (s && !strcmp(s, status_names[i]))
            return i;
    return S_NONE;
}

static void clear_bar(batch_t *b)
{
    if (b->bar_drawn) {
        fputs("\r\033[K", stderr);
        b->bar_drawn = 0;
    }
}

static void progress(batch_t *b, int final)
{
    int64_t now = pq_mono_ms(), el = now - b->t0;
    double rate;
    size_t done = b->wait ? b->terminal : b->submitted;

    if (!final && now - b->last_progress < (b->c->stderr_tty ? 100 : 2000))
        return;
    b->last_progress = now;
    rate = el > 0 ? (double)done * 1000.0 / (double)el : 0.0;
    if (b->c->stderr_tty) {
        char bar[31];
        size_t fill = b->njobs ? done * 30 / b->njobs : 30;

        for (size_t i = 0; i < 30; i++)
            bar[i] = i < fill ? '#' : '-';
        bar[30] = '\0';
        fprintf(stderr,
                "\r\033[K[%s] %zu/%zu submitted %zu succeeded %zu failed %zu parked %zu "
                "%.1f jobs/s",
                bar, done, b->njobs, b->submitted, b->counts[S_SUCCEEDED],
                b->counts[S_FAILED] + b->counts[S_EXPIRED] + b->counts[S_CANCELLED] +
                    b->counts[S_REJECTED] + b->counts[S_LOST],
                b->counts[S_PARKED], rate);
        b->bar_drawn = 1;
        if (final)
            clear_bar(b);
    } else if (!final) {
        fprintf(stderr,
                "promptq: batch: submitted %zu/%zu, succeeded %zu, failed %zu, parked %zu, "
                "%.1f jobs/s\n",
                b->submitted, b->njobs, b->counts[S_SUCCEEDED],
                b->counts[S_FAILED] + b->counts[S_EXPIRED] + b->counts[S_CANCELLED] +
                    b->counts[S_REJECTED] + b->counts[S_LOST],
                b->counts[S_PARKED], rate);
    }
    fflush(stderr);
}

/* Records a job's new status (moving the counters). */
static void set_status(batch_t *b, bjob_t *j, int st)
{
    b->counts[j->status]--;
    b->counts[st]++;
    j->status = (unsigned char)st;
}

static void finish(batch_t *b, bjob_t *j, int st, const char *error)
{
    set_status(b, j, st);
    j->state = J_DONE;
    b->terminal++;
    free(j->body);
    j->body = NULL;
    if (error && !j->error)
        j->error = strdup(error);
    if (error && st != S_SUCCEEDED && b->reports < BATCH_MAX_REPORTS) {
        clear_bar(b);
        pq_cli_errorf("line %d%s%s: %s %s", j->line, j->id ? " " : "", j->id ? j->id : "",
                      status_names[st], error);
        if (++b->reports == BATCH_MAX_REPORTS)
            pq_cli_errorf("(further failures are counted, not shown)");
    }
}

/* "<status> <type>: <message>" of an HTTP error answer into buf. */
static void answer_error(const pq_cli_resp_t *r, char *buf, size_t size)
{
    json_t *doc = pq_cli_resp_json(r), *e = json_object_get(doc, "error");
    const char *type = json_string_value(json_object_get(e, "type"));
    const char *msg = json_string_value(json_object_get(e, "message"));

    if (r->status == 0)
        snprintf(buf, size, "cannot reach the broker: %s",
                 r->errbuf[0] ? r->errbuf : curl_easy_strerror(r->cerr));
    else
        snprintf(buf, size, "%ld %s: %s", r->status, type ? type : "http_error",
                 msg ? msg : "(no error message)");
    for (char *p = buf; *p; p++)
        if ((unsigned char)*p < 0x20)
            *p = ' ';
    json_decref(doc);
}

/* "type: message" of a terminal record's error into buf. */
static void record_error(const json_t *rec, char *buf, size_t size)
{
    const json_t *e = json_object_get(rec, "error");
    const char *type = json_string_value(json_object_get(e, "type"));
    const char *msg = json_string_value(json_object_get(e, "message"));

    snprintf(buf, size, "%s: %s", type ? type : "error", msg ? msg : "(no message)");
    for (char *p = buf; *p; p++)
        if ((unsigned char)*p < 0x20)
            *p = ' ';
}

static int start(batch_t *b, slot_t *s, int ji, int poll)
{
    bjob_t *j = &b->jobs[ji];
    char path[512], idem[96];
    int rc;

    pq_cli_resp_reset(&s->r);
    if (poll) {
        char *esc = pq_cli_escape(j->id);

        if (!esc)
            return -1;
        snprintf(path, sizeof(path), "/v1/jobs/%s", esc);
        curl_free(esc);
        rc = pq_cli_easy_setup(b->c, s->h, "GET", path, NULL, 0, NULL, &s->hdrs, &s->r);
    } else {
        snprintf(idem, sizeof(idem), "Idempotency-Key: cli-%s-%d", b->run_id, j->line);
        rc = pq_cli_easy_setup(b->c, s->h, "POST", "/v1/jobs", j->body, j->len, idem, &s->hdrs,
                               &s->r);
    }
    if (rc || curl_multi_add_handle(b->multi, s->h) != CURLM_OK) {
        curl_slist_free_all(s->hdrs);
        s->hdrs = NULL;
        return -1;
    }
    s->job = ji;
    s->poll = poll;
    j->state = J_INFLIGHT;
    b->inflight++;
    if (poll)
        b->inflight_polls++;
    return 0;
}

static void schedule_poll(batch_t *b, int ji, int64_t delay)
{
    bjob_t *j = &b->jobs[ji];

    j->state = J_POLL_WAIT;
    if (heap_push(&b->polls, pq_mono_ms() + delay, ji))
        finish(b, j, S_LOST, "out of memory");
}

static void schedule_resubmit(batch_t *b, int ji, int64_t delay)
{
    bjob_t *j = &b->jobs[ji];

    j->state = J_SUBMIT_WAIT;
    if (heap_push(&b->resubmit, pq_mono_ms() + delay, ji))
        finish(b, j, S_LOST, "out of memory");
}

/* Next poll delay of a job: doubling from 50 ms up to 1 s, or up to pending/2 ms with many
 * jobs pending, so that the steady poll load stays near 2000 requests/s at most. */
static int64_t backoff(batch_t *b, bjob_t *j)
{
    int64_t d = j->delay_ms, cap = (int64_t)(b->njobs - b->terminal) / 2;

    if (cap < PQ_CLI_POLL_MAX_MS)
        cap = PQ_CLI_POLL_MAX_MS;
    j->delay_ms = (int)pq_cli_backoff_next(j->delay_ms, cap);
    return d;
}

/* Handles a transport failure; returns 1 when the whole run must stop (unreachable). */
static int transport_failed(batch_t *b, const pq_cli_resp_t *r)
{
    if (b->abort_rc)
        return 1;
    if (!pq_cli_is_unreachable(r->cerr))
        return 0;
    if (!b->any_answer) {
        /* never reached it at all: a wrong URL or a broker that is not running */
        b->abort_rc = pq_cli_report(b->c, NULL, r);
        return 1;
    }
    if (pq_cli_unreachable_expired(&b->unreachable_since)) {
        clear_bar(b);
        b->abort_rc = pq_cli_report(b->c, NULL, r);
        return 1;
    }
    return 0;
}

/* Ends job j after an unusable answer r (or none) with status st and the answer as its error.
 * A 401/403 also stops the run (reported once): every other job would get the same answer. */
static void answer_failed(batch_t *b, bjob_t *j, const pq_cli_resp_t *r, int st)
{
    char err[1024];

    answer_error(r, err, sizeof(err));
    if (r->status == 401 || r->status == 403) {
        if (!b->abort_rc) {
            clear_bar(b);
            b->abort_rc = pq_cli_report(b->c, NULL, r);
        }
        b->reports = BATCH_MAX_REPORTS;
    }
    finish(b, j, st, err);
}

/* The answer (or transport failure, the run going on) of a submission. */
static void submit_done(batch_t *b, slot_t *s)
{
    bjob_t *j = &b->jobs[s->job];
    int ji = s->job;

    if (s->r.status == 0) {
        if (++j->tries >= BATCH_SUBMIT_TRIES)
            answer_failed(b, j, &s->r, S_LOST);
        else
            schedule_resubmit(b, ji, 200LL << (j->tries < 5 ? j->tries : 5));
        return;
    }
    if (s->r.status == 202 || s->r.status == 200 || s->r.status == 201) {
        json_t *doc = pq_cli_resp_json(&s->r);
        const char *id = json_string_value(json_object_get(doc, "id"));

        if (!id || !(j->id = strdup(id))) {
            json_decref(doc);
            finish(b, j, S_LOST, "the broker acknowledged without a job id");
            return;
        }
        json_decref(doc);
        b->submitted++;
        free(j->body);
        j->body = NULL;
        set_status(b, j, S_QUEUED);
        if (!b->wait) {
            j->state = J_DONE;
            b->terminal++;
            return;
        }
        j->delay_ms = PQ_CLI_POLL_MIN_MS;
        schedule_poll(b, ji, backoff(b, j));
        return;
    }
    if ((s->r.status == 503 || s->r.status == 429) && ++j->tries < BATCH_SUBMIT_TRIES) {
        int64_t d = s->r.retry_after_s > 0 ? s->r.retry_after_s * 1000LL : 250LL << j->tries;

        schedule_resubmit(b, ji, d > 5000 ? 5000 : d);
        return;
    }
    answer_failed(b, j, &s->r, S_REJECTED);
}

/* The answer (or transport failure, the run going on) of a poll. */
static void poll_done(batch_t *b, slot_t *s)
{
    bjob_t *j = &b->jobs[s->job];
    int ji = s->job;
    char err[1024];

    if (s->r.status == 0) {
        schedule_poll(b, ji, backoff(b, j));
        return;
    }
    if (s->r.status == 200) {
        json_t *rec = pq_cli_resp_json(&s->r);
        int st = status_of(json_string_value(json_object_get(rec, "status")));

        if (st >= S_SUCCEEDED) {
            if (st != S_SUCCEEDED)
                record_error(rec, err, sizeof(err));
            finish(b, j, st, st == S_SUCCEEDED ? NULL : err);
        } else {
            if (st != S_NONE && st != j->status) {
                set_status(b, j, st);
                j->delay_ms = PQ_CLI_POLL_MIN_MS;
            }
            schedule_poll(b, ji, backoff(b, j));
        }
        json_decref(rec);
        return;
    }
    if (s->r.status == 404 || s->r.status == 429 || s->r.status / 100 == 5) {
        /* 404: the queued record is written best effort; 5xx/429: come back later */
        schedule_poll(b, ji, pq_cli_retry_after_ms(&s->r, backoff(b, j)));
        return;
    }
    answer_failed(b, j, &s->r, S_LOST);
}

static void reap(batch_t *b)
{
    CURLMsg *m;
    int left;

    while ((m = curl_multi_info_read(b->multi, &left))) {
        slot_t *s = NULL;

        if (m->msg != CURLMSG_DONE)
            continue;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&s);
        curl_multi_remove_handle(b->multi, s->h);
        curl_easy_setopt(s->h, CURLOPT_HTTPHEADER, NULL);
        curl_slist_free_all(s->hdrs);
        s->hdrs = NULL;
        s->r.cerr = m->data.result;
        if (m->data.result == CURLE_OK)
            curl_easy_getinfo(s->h, CURLINFO_RESPONSE_CODE, &s->r.status);
        else if (!s->r.errbuf[0])
            pq_strlcpy(s->r.errbuf, curl_easy_strerror(m->data.result), sizeof(s->r.errbuf));
        b->inflight--;
        if (s->poll)
            b->inflight_polls--;
        if (s->r.status) {
            b->any_answer = 1;
            b->unreachable_since = 0;
        }
        /* a transport failure may stop the whole run (unreachable) */
        if (s->r.status != 0 || !transport_failed(b, &s->r)) {
            if (s->poll)
                poll_done(b, s);
            else
                submit_done(b, s);
        }
        s->job = -1;
        pq_cli_resp_reset(&s->r);
    }
}

/* Starts transfers on free slots. Returns the ms until the next timed item (or 200). */
static int64_t fill(batch_t *b)
{
    int64_t now = pq_mono_ms(), next = 200;
    int poll_cap = b->next_new < b->njobs ? (b->nslots / 4 > 0 ? b->nslots / 4 : 1) : b->nslots;

    for (int i = 0; i < b->nslots && b->inflight < b->nslots && !b->abort_rc; i++) {
        slot_t *s = &b->slots[i];
        int ji = -1, poll = 0;

        if (s->job >= 0)
            continue;
        if (b->resubmit.n && b->resubmit.v[0].due <= now) {
            ji = heap_pop(&b->resubmit).job;
        } else if (b->polls.n && b->polls.v[0].due <= now && b->inflight_polls < poll_cap) {
            ji = heap_pop(&b->polls).job;
            poll = 1;
        } else if (b->next_new < b->njobs) {
            ji = (int)b->next_new++;
        } else {
            break;
        }
        if (start(b, s, ji, poll))
            finish(b, &b->jobs[ji], S_LOST, "cannot start the request");
    }
    if (b->resubmit.n && b->resubmit.v[0].due - now < next)
        next = b->resubmit.v[0].due - now;
    if (b->polls.n && b->inflight_polls < poll_cap && b->polls.v[0].due - now < next)
        next = b->polls.v[0].due - now;
    return next < 0 ? 0 : next;
}

/* Reads and converts the input; returns 0, or the exit code after printing the reasons. */
static int load(batch_t *b, const char *file, const char *model)
{
    FILE *fp = strcmp(file, "-") ? fopen(file, "rb") : stdin;
    char *line = NULL, errstr[256];
    size_t cap = 0, alloc = 0;
    ssize_t n;
    int lineno = 0, bad = 0, rc = PQ_CLI_EXIT_USAGE;

    if (!fp) {
        pq_cli_errorf("batch: %s: %s", file, strerror(errno));
        return PQ_CLI_EXIT_USAGE;
    }
    while ((n = getline(&line, &cap, fp)) >= 0) {
        json_t *env;
        bjob_t *j;
        size_t k;

        lineno++;
        if ((size_t)n > PQ_CLI_MAX_INPUT || lineno > BATCH_MAX_LINES) {
            pq_cli_errorf("%s:%d: line too long or too many lines", file, lineno);
            goto out;
        }
        for (k = 0; k < (size_t)n && strchr(" \t\r\n", line[k]); k++)
            ;
        if (k == (size_t)n)
            continue; /* blank */
        env = pq_cli_envelope_from_line(line, (size_t)n, model, errstr, sizeof(errstr));
        if (!env) {
            if (bad++ < BATCH_MAX_REPORTS)
                pq_cli_errorf("%s:%d: %s", file, lineno, errstr);
            continue;
        }
        if (b->njobs == alloc) {
            size_t na = alloc ? alloc * 2 : 1024;
            bjob_t *nj = realloc(b->jobs, na * sizeof(*nj));

            if (!nj) {
                json_decref(env);
                pq_cli_errorf("batch: out of memory");
                goto out;
            }
            b->jobs = nj;
            alloc = na;
        }
        j = &b->jobs[b->njobs];
        memset(j, 0, sizeof(*j));
        j->line = lineno;
        j->body = json_dumps(env, JSON_COMPACT);
        json_decref(env);
        if (!j->body) {
            pq_cli_errorf("batch: out of memory");
            goto out;
        }
        j->len = strlen(j->body);
        b->njobs++;
    }
    if (ferror(fp)) {
        pq_cli_errorf("batch: %s: %s", file, strerror(errno));
        goto out;
    }
    if (bad) {
        pq_cli_errorf("batch: %d bad line(s) in %s; nothing was submitted", bad, file);
        goto out;
    }
    if (!b->njobs) {
        pq_cli_errorf("batch: %s has no jobs", file);
        goto out;
    }
    rc = 0;
out:
    free(line);
    if (fp != stdin)
        fclose(fp);
    return rc;
}

static void print_results(batch_t *b)
{
    int64_t el = pq_mono_ms() - b->t0;
    size_t pending = b->njobs - b->terminal;

    if (b->c->json) {
        for (size_t i = 0; i < b->njobs; i++) {
            bjob_t *j = &b->jobs[i];
            json_t *o = json_pack("{s:i,s:s*,s:s,s:s*}", "line", j->line, "id", j->id, "status",
                                  status_names[j->status], "error", j->error);

            if (o) {
                json_dumpf(o, stdout, JSON_COMPACT);
                fputc('\n', stdout);
                json_decref(o);
            }
        }
    }
    if (!b->c->json && !b->wait) {
        for (size_t i = 0; i < b->njobs; i++)
            if (b->jobs[i].id)
                printf("%s\n", b->jobs[i].id);
    }
    fprintf(b->c->json ? stderr : stdout,
            "batch: %zu jobs: %zu submitted, %zu succeeded, %zu failed, %zu expired, "
            "%zu cancelled, %zu rejected, %zu lost, %zu not finished, in %.2f s (%.1f jobs/s)\n",
            b->njobs, b->submitted, b->counts[S_SUCCEEDED], b->counts[S_FAILED],
            b->counts[S_EXPIRED], b->counts[S_CANCELLED], b->counts[S_REJECTED], b->counts[S_LOST],
            pending, (double)el / 1000.0,
            el > 0 ? (double)(b->wait ? b->terminal : b->submitted) * 1000.0 / (double)el : 0.0);
    fflush(stdout);
}

int pq_cli_cmd_batch(pq_cli_t *c, int argc, char **argv)
{
    const char *model = getenv("PROMPTQ_MODEL"), *file = NULL, *v;
    int conc = 16, nowait = 0, only_pos = 0, rc = PQ_CLI_EXIT_USAGE, npos = 0;
    batch_t b;
    unsigned char rnd[8];

    memset(&b, 0, sizeof(b));
    if (model && !*model)
        model = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int k = pq_cli_arg_next(c, argc, argv, &i, &only_pos, batch_help, &rc);

        if (k == PQ_CLI_ARG_STOP)
            return rc;
        if (k == PQ_CLI_ARG_DONE)
            continue;
        if (k == PQ_CLI_ARG_POS) {
            file = a;
            npos++;
            continue;
        }
        if (!strcmp(a, "--no-wait")) {
            nowait = 1;
        } else if (pq_cli_opt_is(a, "--model")) {
            if (!(model = pq_cli_opt_value(argc, argv, &i, "--model")))
                return PQ_CLI_EXIT_USAGE;
        } else if (pq_cli_opt_is(a, "--concurrency")) {
            char *end;
            long n;

            if (!(v = pq_cli_opt_value(argc, argv, &i, "--concurrency")))
                return PQ_CLI_EXIT_USAGE;
            n = strtol(v, &end, 10);
            if (end == v || *end || n < 1 || n > 1024) {
                pq_cli_errorf("--concurrency: expected 1..1024, got %.100s", v);
                return PQ_CLI_EXIT_USAGE;
            }
            conc = (int)n;
        } else {
            pq_cli_errorf("batch: unknown option %.100s (see promptq batch --help)", a);
            return PQ_CLI_EXIT_USAGE;
        }
    }
    if (npos != 1) {
        pq_cli_errorf("batch: expected one FILE.jsonl (or -); see promptq batch --help");
        return PQ_CLI_EXIT_USAGE;
    }
    if (pq_cli_ready(c))
        return PQ_CLI_EXIT_USAGE;

    b.c = c;
    b.wait = !nowait;
    if ((rc = load(&b, file, model)))
        goto out;
    rc = PQ_CLI_EXIT_FAILED;
    b.counts[S_NONE] = b.njobs;
    if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
        int64_t t = pq_now_ms() ^ getpid();

        memcpy(rnd, &t, sizeof(rnd));
    }
    for (size_t i = 0; i < sizeof(rnd); i++)
        snprintf(b.run_id + 2 * i, 3, "%02x", rnd[i]);

    if ((size_t)conc > b.njobs)
        conc = (int)b.njobs;
    b.nslots = conc;
    b.slots = calloc((size_t)conc, sizeof(*b.slots));
    b.multi = curl_multi_init();
    if (!b.slots || !b.multi)
        goto out;
    curl_multi_setopt(b.multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)conc);
    curl_multi_setopt(b.multi, CURLMOPT_MAXCONNECTS, (long)conc);
    for (int i = 0; i < conc; i++) {
        b.slots[i].job = -1;
        pq_cli_resp_reset(&b.slots[i].r);
        if (!(b.slots[i].h = curl_easy_init()))
            goto out;
        curl_easy_setopt(b.slots[i].h, CURLOPT_PRIVATE, (char *)&b.slots[i]);
    }

    b.t0 = b.last_progress = pq_mono_ms();
    while (b.terminal < b.njobs && !b.abort_rc) {
        int64_t wait_ms = fill(&b), left = pq_cli_remaining_ms(c);
        int running;

        if (left <= 0) {
            clear_bar(&b);
            pq_cli_errorf("batch: timed out with %zu job(s) not finished", b.njobs - b.terminal);
            break;
        }
        if (wait_ms > left)
            wait_ms = left;
        if (b.inflight)
            curl_multi_poll(b.multi, NULL, 0, (int)(wait_ms > 100 ? 100 : wait_ms), NULL);
        else if (wait_ms > 0)
            usleep((useconds_t)(wait_ms > 100 ? 100 : wait_ms) * 1000);
        curl_multi_perform(b.multi, &running);
        reap(&b);
        progress(&b, 0);
    }
    progress(&b, 1);
    print_results(&b);
    if (b.abort_rc)
        rc = b.abort_rc;
    else if (b.terminal == b.njobs && b.counts[b.wait ? S_SUCCEEDED : S_QUEUED] == b.njobs)
        rc = PQ_CLI_EXIT_OK;
    else
        rc = PQ_CLI_EXIT_FAILED;
out:
    for (int i = 0; b.slots && i < b.nslots; i++) {
        if (b.slots[i].h) {
            if (b.slots[i].job >= 0)
                curl_multi_remove_handle(b.multi, b.slots[i].h);
            curl_easy_cleanup(b.slots[i].h);
        }
        curl_slist_free_all(b.slots[i].hdrs);
        pq_cli_resp_reset(&b.slots[i].r);
    }
    if (b.multi)
        curl_multi_cleanup(b.multi);
    free(b.slots);
    for (size_t i = 0; i < b.njobs; i++) {
        free(b.jobs[i].body);
        free(b.jobs[i].id);
        free(b.jobs[i].error);
    }
    free(b.jobs);
    free(b.resubmit.v);
    free(b.polls.v);
    return rc;
}
