/* promptq: command-line client of promptq-broker's HTTP API (DESIGN §5, §7).
 *
 *   promptq [global options] COMMAND [options] [args]
 *
 * Global options may also appear after the command. Exit codes: 0 ok, 1 the job or request
 * failed, 2 usage error, 3 cannot reach the broker. */
#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage_text[] =
    "usage: promptq [global options] COMMAND [options] [args]\n"
    "\n"
    "commands:\n"
    "  submit [--model ROUTE] [--id ID] [--metadata JSON] [--deadline RFC3339] [--wait] PROMPT|-\n"
    "  submit --file ENVELOPE.json|- [--wait]\n"
    "                    submit one job (POST /v1/jobs); prints its id, or with --wait its answer\n"
    "  get ID            show a job (GET /v1/jobs/ID)\n"
    "  watch ID...       follow jobs until they are terminal, printing status changes\n"
    "  list [--status STATUS] [--limit N] [--after ID] [--all]\n"
    "                    your jobs, newest first (GET /v1/jobs)\n"
    "  cancel ID         cancel a job that has not run yet (DELETE /v1/jobs/ID)\n"
    "  batch FILE.jsonl [--model ROUTE] [--concurrency N] [--no-wait]\n"
    "                    submit each line as a job and wait for all of them\n"
    "  health            providers, circuits, lag and parked jobs (GET /v1/health, else /readyz)\n"
    "  parked [ROUTE]    parked jobs per route (GET /v1/parked)\n"
    "  parked replay ROUTE       replay a route's parked jobs now\n"
    "  parked drop ROUTE --yes   drop a route's parked jobs\n"
    "  dlq redrive       re-submit dead-lettered jobs (POST /v1/dlq/redrive)\n"
    "  models            the configured routes (GET /v1/models)\n"
    "\n"
    "global options:\n"
    "  --url URL         broker base URL (else $PROMPTQ_URL, default " PQ_CLI_DEFAULT_URL ")\n"
    "  --key KEY         API key, sent as Authorization: Bearer (else $PROMPTQ_API_KEY)\n"
    "  --json            machine-readable output\n"
    "  --timeout SECONDS overall time limit of the command (requests default to 30 s each)\n"
    "  -h, --help        help (also per command: promptq COMMAND --help)\n"
    "\n"
    "exit codes: 0 ok, 1 the job or request failed, 2 usage error, 3 cannot reach the broker\n";

int pq_cli_opt_is(const char *arg, const char *name)
{
    size_t n = strlen(name);

    return !strncmp(arg, name, n) && (arg[n] == '\0' || arg[n] == '=');
}

const char *pq_cli_opt_value(int argc, char **argv, int *i, const char *name)
{
    const char *arg = argv[*i], *eq = strchr(arg, '=');

    if (eq && arg[0] == '-' && arg[1] == '-')
        return eq + 1;
    if (*i + 1 >= argc) {
        pq_cli_errorf("%s needs a value", name);
        return NULL;
    }
    (*i)++;
    return argv[*i];
}

int pq_cli_arg_next(pq_cli_t *c, int argc, char **argv, int *i, int *only_pos, const char *help,
                    int *rc)
{
    const char *a = argv[*i];
    int g;

    if (*only_pos || a[0] != '-' || !a[1])
        return PQ_CLI_ARG_POS;
    if (!strcmp(a, "--")) {
        *only_pos = 1;
        return PQ_CLI_ARG_DONE;
    }
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
        fputs(help, stdout);
        *rc = PQ_CLI_EXIT_OK;
        return PQ_CLI_ARG_STOP;
    }
    if ((g = pq_cli_global_opt(c, argc, argv, i)) < 0) {
        *rc = PQ_CLI_EXIT_USAGE;
        return PQ_CLI_ARG_STOP;
    }
    return g ? PQ_CLI_ARG_DONE : PQ_CLI_ARG_OPT;
}

int pq_cli_parse_args(pq_cli_t *c, int argc, char **argv, const char *help, const char **pos,
                      int max, int *yes, int *rc)
{
    int n = 0, only_pos = 0;

    *rc = PQ_CLI_EXIT_USAGE;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int k = pq_cli_arg_next(c, argc, argv, &i, &only_pos, help, rc);

        if (k == PQ_CLI_ARG_STOP)
            return -1;
        if (k == PQ_CLI_ARG_POS) {
            if (n >= max)
                return max + 1;
            pos[n++] = a;
        } else if (k == PQ_CLI_ARG_OPT && yes && (!strcmp(a, "--yes") || !strcmp(a, "-y"))) {
            *yes = 1;
        } else if (k == PQ_CLI_ARG_OPT) {
            pq_cli_errorf("%s: unknown option %.100s (see promptq %s --help)", argv[0], a, argv[0]);
            return -1;
        }
    }
    return n;
}

int pq_cli_global_opt(pq_cli_t *c, int argc, char **argv, int *i)
{
    const char *arg = argv[*i], *v;

    if (pq_cli_opt_is(arg, "--url")) {
        if (!(v = pq_cli_opt_value(argc, argv, i, "--url")))
            return -1;
        if (pq_cli_set_url(c, v)) {
            pq_cli_errorf("--url: expected http://HOST:PORT or https://..., got %.200s", v);
            return -1;
        }
        return 1;
    }
    if (pq_cli_opt_is(arg, "--key")) {
        if (!(v = pq_cli_opt_value(argc, argv, i, "--key")))
            return -1;
        if (c->key_own) {
            memset(c->key_own, 0, strlen(c->key_own));
            free(c->key_own);
        }
        c->key_own = *v ? strdup(v) : NULL;
        c->key = c->key_own;
        memset((char *)v, 0, strlen(v)); /* hide it from /proc/PID/cmdline */
        return 1;
    }
    if (!strcmp(arg, "--json")) {
        c->json = 1;
        return 1;
    }
    if (pq_cli_opt_is(arg, "--timeout")) {
        char *end;
        double s;

        if (!(v = pq_cli_opt_value(argc, argv, i, "--timeout")))
            return -1;
        s = strtod(v, &end);
        if (end == v || *end || !(s > 0) || s > 1e7 || isnan(s)) {
            pq_cli_errorf("--timeout: expected a positive number of seconds, got %.100s", v);
            return -1;
        }
        c->timeout_ms = (int64_t)(s * 1000.0);
        if (c->timeout_ms < 1)
            c->timeout_ms = 1;
        return 1;
    }
    return 0;
}

typedef int (*cmd_fn)(pq_cli_t *, int, char **);

static const struct {
    const char *name;
    cmd_fn fn;
} commands[] = {
    {"submit", pq_cli_cmd_submit}, {"get", pq_cli_cmd_get},       {"watch", pq_cli_cmd_watch},
    {"cancel", pq_cli_cmd_cancel}, {"list", pq_cli_cmd_list},     {"batch", pq_cli_cmd_batch},
    {"health", pq_cli_cmd_health}, {"parked", pq_cli_cmd_parked}, {"dlq", pq_cli_cmd_dlq},
    {"models", pq_cli_cmd_models},
};

int main(int argc, char **argv)
{
    pq_cli_t cli;
    int i, rc = PQ_CLI_EXIT_USAGE;
    cmd_fn fn = NULL;

    pq_cli_init(&cli);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        pq_cli_errorf("cannot initialise libcurl");
        return PQ_CLI_EXIT_FAILED;
    }
    /* global options before the command */
    for (i = 1; i < argc; i++) {
        int g;

        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(usage_text, stdout);
            rc = PQ_CLI_EXIT_OK;
            goto out;
        }
        if (!strcmp(argv[i], "--version")) {
            printf("promptq 0.1.0 (%s)\n", curl_version());
            rc = PQ_CLI_EXIT_OK;
            goto out;
        }
        g = pq_cli_global_opt(&cli, argc, argv, &i);
        if (g < 0)
            goto out;
        if (g == 0)
            break;
    }
    if (i >= argc) {
        fputs(usage_text, stderr);
        goto out;
    }
    for (size_t k = 0; k < sizeof(commands) / sizeof(commands[0]); k++)
        if (!strcmp(argv[i], commands[k].name))
            fn = commands[k].fn;
    if (!fn) {
        if (argv[i][0] == '-')
            pq_cli_errorf("unknown option %.100s (see promptq --help)", argv[i]);
        else
            pq_cli_errorf("unknown command %.100s (see promptq --help)", argv[i]);
        goto out;
    }
    /* the command sees argv[0] = its name; it parses its own and the global options, then
     * calls pq_cli_ready() before the first request */
    rc = fn(&cli, argc - i, argv + i);
out:
    pq_cli_term(&cli);
    curl_global_cleanup();
    return rc;
}
