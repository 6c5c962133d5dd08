/* promptq list: the tenant's jobs, newest first (GET /v1/jobs?status=&after=&limit=), one line
 * per job, or each page's answer verbatim with --json; --all follows has_more with
 * after=last_id. */
#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LIST_MAX_JOBS  100000 /* --all stops after this many jobs */
#define LIST_PAGE_MAX  100    /* the broker's largest page */
#define LIST_BUSY_MAX  5      /* retries of one page answered 429/502/503/504 */
#define LIST_ID_MIN_W  30     /* "job_" + 26 characters: the width of a broker-made id */
#define LIST_RTE_MIN_W 12

static const char list_help[] =
    "usage: promptq list [--status STATUS] [--limit N] [--after ID] [--all]\n"
    "\n"
    "Lists your jobs, newest first (GET /v1/jobs): one line per job with its id, status,\n"
    "route, created_at and attempts. Without --all, one page; when there are more, the\n"
    "option that shows the next page is printed on stderr. With --json, each page's answer as\n"
    "one JSON line.\n"
    "\n"
    "  --status STATUS  only jobs in STATUS: queued, running, parked, succeeded, failed,\n"
    "                   expired or cancelled\n"
    "  --limit N        jobs per page, 1 to 100 (default: the broker's, 20)\n"
    "  --after ID       start after job ID (the previous page's last_id)\n"
    "  --all            follow the pages to the end (at most 100000 jobs; exit 1 beyond)\n";

static const char *const list_statuses[] = {"queued", "running", "parked",   "succeeded",
                                            "failed", "expired", "cancelled"};

/* Column widths; they only grow, so pages printed one after another stay aligned. header: the
 * header line is still to be printed (on a terminal, before the first job). */
typedef struct list_cols_s {
    int id, route, header;
} list_cols_t;

static const char *list_status_valid(const char *s)
{
    for (size_t i = 0; i < sizeof(list_statuses) / sizeof(list_statuses[0]); i++)
        if (!strcmp(s, list_statuses[i]))
            return list_statuses[i];
    return NULL;
}

/* Prints s (or "-" when NULL or empty) with control characters as spaces, padded to width. */
static void list_field(const char *s, int width)
{
    int n = 0;

    if (!s || !*s)
        s = "-";
    for (; *s; s++, n++)
        putchar((unsigned char)*s < 0x20 || *s == 0x7f ? ' ' : *s);
    if (width > 0)
        printf("%*s", width > n ? width - n + 1 : 1, "");
}

static int list_width(const json_t *item, const char *k)
{
    const char *s = json_string_value(json_object_get(item, k));

    return s && *s ? (int)strlen(s) : 1;
}

/* Prints one page's jobs as aligned lines (at most max of them); returns how many. */
static size_t list_print_page(const json_t *data, list_cols_t *cols, size_t max)
{
    const json_t *item;
    size_t i, n = 0;

    json_array_foreach(data, i, item)
    {
        int w;

        if (i >= max)
            break;
        if ((w = list_width(item, "id")) > cols->id)
            cols->id = w;
        if ((w = list_width(item, "route")) > cols->route)
            cols->route = w;
    }
    if (cols->header && json_array_size(data) && max) {
        printf("%-*s %-9s %-*s %-24s %s\n", cols->id, "ID", "STATUS", cols->route, "ROUTE",
               "CREATED", "ATTEMPTS");
        cols->header = 0;
    }
    json_array_foreach(data, i, item)
    {
        const json_t *att = json_object_get(item, "attempts");

        if (n >= max)
            break;
        if (!json_is_object(item))
            continue;
        list_field(json_string_value(json_object_get(item, "id")), cols->id);
        list_field(json_string_value(json_object_get(item, "status")), 9);
        list_field(json_string_value(json_object_get(item, "route")), cols->route);
        list_field(json_string_value(json_object_get(item, "created_at")), 24);
        if (json_is_integer(att))
            printf("%" JSON_INTEGER_FORMAT "\n", json_integer_value(att));
        else
            puts("-");
        n++;
    }
    return n;
}

/* GET one page into r, retrying busy answers (429, 502-504) a few times within --timeout.
 * Returns 0 with a 200 answer, else the exit code after reporting. */
static int list_fetch(pq_cli_t *c, const char *status, long limit, const char *after,
                      pq_cli_resp_t *r)
{
    char path[1024], *esc_status = NULL, *esc_after = NULL;
    int64_t delay = 200;
    int n, rc = PQ_CLI_EXIT_FAILED;

    if ((status && !(esc_status = pq_cli_escape(status))) ||
        (after && !(esc_after = pq_cli_escape(after)))) {
        pq_cli_errorf("list: out of memory");
        goto out;
    }
    n = snprintf(path, sizeof(path), "/v1/jobs?limit=%ld%s%s%s%s", limit,
                 esc_status ? "&status=" : "", esc_status ? esc_status : "",
                 esc_after ? "&after=" : "", esc_after ? esc_after : "");
    if (n < 0 || (size_t)n >= sizeof(path)) {
        pq_cli_errorf("list: --after: the job id is too long");
        rc = PQ_CLI_EXIT_USAGE;
        goto out;
    }
    for (int busy = 0;; busy++) {
        int64_t left;

        if (pq_cli_request(c, "GET", path, NULL, 0, NULL, r)) {
            rc = pq_cli_report(c, "GET /v1/jobs", r);
            goto out;
        }
        if (r->status == 200) {
            rc = 0;
            goto out;
        }
        left = pq_cli_remaining_ms(c);
        if (busy >= LIST_BUSY_MAX || left <= 0 ||
            (r->status != 429 && r->status != 502 && r->status != 503 && r->status != 504)) {
            rc = pq_cli_report(c, "GET /v1/jobs", r);
            goto out;
        }
        delay = pq_cli_retry_after_ms(r, delay);
        pq_cli_sleep_ms(delay < left ? delay : left);
        delay = pq_cli_backoff_next(delay, 2000);
    }
out:
    curl_free(esc_status);
    curl_free(esc_after);
    return rc;
}

int pq_cli_cmd_list(pq_cli_t *c, int argc, char **argv)
{
    const char *status = NULL, *after_arg = NULL, *v;
    char *after = NULL;
    long limit = 0;
    int all = 0, only_pos = 0, rc = PQ_CLI_EXIT_USAGE;
    size_t total = 0;
    list_cols_t cols = {LIST_ID_MIN_W, LIST_RTE_MIN_W, 0};
    pq_cli_resp_t r = {0};
    json_t *doc = NULL;

    pq_cli_resp_reset(&r);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int k = pq_cli_arg_next(c, argc, argv, &i, &only_pos, list_help, &rc);

        if (k == PQ_CLI_ARG_STOP)
            goto out;
        if (k == PQ_CLI_ARG_DONE)
            continue;
        rc = PQ_CLI_EXIT_USAGE;
        if (k == PQ_CLI_ARG_POS) {
            pq_cli_errorf("list: unexpected argument %.100s (see promptq list --help)", a);
            goto out;
        }
        if (!strcmp(a, "--all")) {
            all = 1;
        } else if (pq_cli_opt_is(a, "--status")) {
            if (!(v = pq_cli_opt_value(argc, argv, &i, "--status")))
                goto out;
            if (!(status = list_status_valid(v))) {
                pq_cli_errorf("list: --status %.100s: expected one of queued, running, parked, "
                              "succeeded, failed, expired, cancelled",
                              v);
                goto out;
            }
        } else if (pq_cli_opt_is(a, "--limit")) {
            char *end;

            if (!(v = pq_cli_opt_value(argc, argv, &i, "--limit")))
                goto out;
            errno = 0;
            limit = strtol(v, &end, 10);
            if (end == v || *end || errno || limit < 1 || limit > LIST_PAGE_MAX) {
                pq_cli_errorf("list: --limit must be 1 to %d, got %.100s", LIST_PAGE_MAX, v);
                goto out;
            }
        } else if (pq_cli_opt_is(a, "--after")) {
            if (!(v = pq_cli_opt_value(argc, argv, &i, "--after")))
                goto out;
            if (!*v) {
                pq_cli_errorf("list: --after needs a job id");
                goto out;
            }
            after_arg = v;
        } else {
            pq_cli_errorf("list: unknown option %.100s (see promptq list --help)", a);
            goto out;
        }
    }
    if (pq_cli_ready(c))
        goto out;
    if (!limit)
        limit = all ? LIST_PAGE_MAX : 20;
    cols.header = c->stdout_tty;
    if (after_arg && !(after = strdup(after_arg))) {
        rc = PQ_CLI_EXIT_FAILED;
        goto out;
    }
    for (;;) {
        long want = limit;
        const json_t *data, *more, *last;
        size_t n;

        if (all && (size_t)want > LIST_MAX_JOBS - total)
            want = (long)(LIST_MAX_JOBS - total);
        if ((rc = list_fetch(c, status, want, after, &r)))
            goto out;
        json_decref(doc);
        doc = pq_cli_resp_json(&r);
        data = json_object_get(doc, "data");
        more = json_object_get(doc, "has_more");
        last = json_object_get(doc, "last_id");
        if (!json_is_array(data)) {
            pq_cli_errorf("GET /v1/jobs: the broker's answer is not a list");
            rc = PQ_CLI_EXIT_FAILED;
            goto out;
        }
        if (c->json) {
            fwrite(r.body, 1, r.len, stdout);
            if (!r.len || r.body[r.len - 1] != '\n')
                fputc('\n', stdout);
            n = json_array_size(data);
        } else {
            n = list_print_page(data, &cols, (size_t)want);
        }
        total += n;
        rc = PQ_CLI_EXIT_OK;
        if (!json_is_true(more))
            break;
        if (!json_is_string(last) || (after && !strcmp(after, json_string_value(last)))) {
            pq_cli_errorf("GET /v1/jobs: has_more without a new last_id; stopped");
            rc = PQ_CLI_EXIT_FAILED;
            break;
        }
        free(after);
        if (!(after = strdup(json_string_value(last)))) {
            rc = PQ_CLI_EXIT_FAILED;
            break;
        }
        if (!all) {
            if (!c->json)
                pq_cli_errorf("more jobs: add --after %s for the next page", after);
            break;
        }
        if (total >= LIST_MAX_JOBS) {
            pq_cli_errorf("list: stopped after %d jobs; continue with --after %s", LIST_MAX_JOBS,
                          after);
            rc = PQ_CLI_EXIT_FAILED;
            break;
        }
        if (pq_cli_remaining_ms(c) <= 0) {
            pq_cli_errorf("list: timed out after %zu jobs; continue with --after %s", total, after);
            rc = PQ_CLI_EXIT_FAILED;
            break;
        }
    }
    fflush(stdout);
out:
    free(after);
    json_decref(doc);
    pq_cli_resp_reset(&r);
    return rc;
}
