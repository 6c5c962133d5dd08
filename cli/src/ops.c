/* Operator commands: health, parked (list, replay, drop), dlq redrive, models. Answers are
 * printed as readable "key: value" trees, or verbatim with --json. */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char health_help[] =
    "usage: promptq health\n"
    "\n"
    "Providers and circuits, lag per lane and parked jobs per route (GET /v1/health). A broker\n"
    "without /v1/health is asked GET /readyz instead. Exit 1 when not healthy/ready.\n";

static const char parked_help[] =
    "usage: promptq parked [ROUTE]          parked jobs (per route) (GET /v1/parked)\n"
    "       promptq parked replay ROUTE     replay ROUTE's parked jobs now\n"
    "                                       (POST /v1/parked/ROUTE/replay)\n"
    "       promptq parked drop ROUTE --yes drop ROUTE's parked jobs (DELETE /v1/parked/ROUTE)\n";

static const char dlq_help[] =
    "usage: promptq dlq redrive [--type TYPE]... [--route ROUTE] [--id ID]... [--limit N]\n"
    "\n"
    "Re-queues dead-lettered jobs of your tenant as new jobs <id>.r<partition>-<offset>\n"
    "(POST /v1/dlq/redrive). A record redriven before is not run again (\"already\").\n"
    "  --type TYPE    error types to redrive (repeatable; default expired, poison and\n"
    "                 permanent = any provider-side failure such as refused)\n"
    "  --route ROUTE  only jobs of this route (request.model)\n"
    "  --id ID        only the dead-lettered job ID (repeatable)\n"
    "  --limit N      at most N jobs per call (1-10000, default 1000); has_more says\n"
    "                 whether to call again\n";

static const char models_help[] = "usage: promptq models\n"
                                  "\n"
                                  "The configured routes (GET /v1/models).\n";

static void print_scalar(FILE *out, const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_STRING:
        for (const char *p = json_string_value(v); *p; p++)
            fputc((unsigned char)*p < 0x20 ? ' ' : *p, out);
        break;
    case JSON_INTEGER:
        fprintf(out, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        break;
    case JSON_REAL:
        fprintf(out, "%g", json_real_value(v));
        break;
    case JSON_TRUE:
        fputs("yes", out);
        break;
    case JSON_FALSE:
        fputs("no", out);
        break;
    default:
        fputs("-", out);
        break;
    }
}

static int is_scalar(const json_t *v)
{
    return !json_is_object(v) && !json_is_array(v);
}

static int all_scalars(const json_t *a)
{
    size_t i;
    json_t *v;

    json_array_foreach(a, i, v) if (!is_scalar(v)) return 0;
    return 1;
}

void pq_cli_print_tree(FILE *out, const json_t *v, int indent)
{
    const char *k;
    json_t *e;
    size_t i;

    if (json_is_object(v)) {
        json_object_foreach((json_t *)v, k, e)
        {
            fprintf(out, "%*s%s:", indent, "", k);
            if (is_scalar(e)) {
                fputc(' ', out);
                print_scalar(out, e);
                fputc('\n', out);
            } else if (json_is_array(e) && all_scalars(e)) {
                json_t *x;
                size_t j;

                json_array_foreach(e, j, x)
                {
                    fputs(j ? ", " : " ", out);
                    print_scalar(out, x);
                }
                fputc('\n', out);
            } else {
                fputc('\n', out);
                pq_cli_print_tree(out, e, indent + 2);
            }
        }
    } else if (json_is_array(v)) {
        json_array_foreach(v, i, e)
        {
            if (is_scalar(e)) {
                fprintf(out, "%*s- ", indent, "");
                print_scalar(out, e);
                fputc('\n', out);
            } else {
                fprintf(out, "%*s-\n", indent, "");
                pq_cli_print_tree(out, e, indent + 2);
            }
        }
    } else {
        fprintf(out, "%*s", indent, "");
        print_scalar(out, v);
        fputc('\n', out);
    }
}

/* Parses "COMMAND [options] ARG..." into pos (borrowed); returns the count or -1 with *rc set.
 * yes: set when --yes is allowed and given (NULL: not allowed). */
static int parse_simple(pq_cli_t *c, int argc, char **argv, const char *help, const char **pos,
                        int max, int *yes, int *rc)
{
    int n = pq_cli_parse_args(c, argc, argv, help, pos, max, yes, rc);

    if (n > max) {
        pq_cli_errorf("%s: too many arguments (see promptq %s --help)", argv[0], argv[0]);
        return -1;
    }
    return n;
}

/* Sends one request and prints its answer (tree or verbatim JSON). Returns the exit code. */
static int simple_call(pq_cli_t *c, const char *method, const char *path, const char *body,
                       const char *what)
{
    pq_cli_resp_t r = {0};
    json_t *doc = NULL;
    int rc;

    pq_cli_resp_reset(&r);
    if (pq_cli_ready(c)) {
        rc = PQ_CLI_EXIT_USAGE;
        goto out;
    }
    if (pq_cli_request(c, method, path, body, body ? strlen(body) : 0, NULL, &r) ||
        r.status / 100 != 2) {
        rc = pq_cli_report(c, what, &r);
        goto out;
    }
    doc = pq_cli_resp_json(&r);
    if (c->json) {
        if (r.body)
            fwrite(r.body, 1, r.len, stdout);
        if (!r.len || r.body[r.len - 1] != '\n')
            fputc('\n', stdout);
    } else if (doc) {
        pq_cli_print_tree(stdout, doc, 0);
    } else {
        printf("%s: %ld\n", what, r.status);
    }
    rc = PQ_CLI_EXIT_OK;
out:
    json_decref(doc);
    pq_cli_resp_reset(&r);
    return rc;
}

int pq_cli_cmd_health(pq_cli_t *c, int argc, char **argv)
{
    const char *pos[1];
    int rc, n = parse_simple(c, argc, argv, health_help, pos, 0, NULL, &rc);
    pq_cli_resp_t r = {0};
    json_t *doc = NULL;

    if (n < 0)
        return rc;
    pq_cli_resp_reset(&r);
    if (pq_cli_ready(c)) {
        rc = PQ_CLI_EXIT_USAGE;
        goto out;
    }
    if (pq_cli_request(c, "GET", "/v1/health", NULL, 0, NULL, &r)) {
        rc = pq_cli_report(c, NULL, &r);
        goto out;
    }
    if (r.status != 404) {
        /* 200 healthy; 503 with a body: degraded (printed the same way) */
        doc = pq_cli_resp_json(&r);
        if (!doc || json_object_get(doc, "error")) {
            rc = pq_cli_report(c, "GET /v1/health", &r);
            goto out;
        }
        if (c->json) {
            json_dumpf(doc, stdout, JSON_COMPACT);
            fputc('\n', stdout);
        } else {
            pq_cli_print_tree(stdout, doc, 0);
        }
        rc = r.status == 200 ? PQ_CLI_EXIT_OK : PQ_CLI_EXIT_FAILED;
        goto out;
    }
    /* an older broker: readiness is what it can tell */
    if (pq_cli_request(c, "GET", "/readyz", NULL, 0, NULL, &r)) {
        rc = pq_cli_report(c, NULL, &r);
        goto out;
    }
    doc = pq_cli_resp_json(&r);
    if (c->json) {
        json_t *o = json_pack("{s:s,s:b,s:i,s:O?}", "source", "readyz", "ready", r.status == 200,
                              "status", (int)r.status, "answer", doc);

        json_dumpf(o, stdout, JSON_COMPACT);
        fputc('\n', stdout);
        json_decref(o);
    } else if (r.status == 200) {
        printf("broker:    %s\nready:     yes (GET /readyz 200; this broker has no /v1/health)\n",
               c->url);
    } else {
        printf("broker:    %s\nready:     no (GET /readyz %ld)\n", c->url, r.status);
        if (doc && json_is_object(json_object_get(doc, "error")))
            pq_cli_report(c, NULL, &r);
    }
    rc = r.status == 200 ? PQ_CLI_EXIT_OK : PQ_CLI_EXIT_FAILED;
out:
    json_decref(doc);
    pq_cli_resp_reset(&r);
    return rc;
}

int pq_cli_cmd_parked(pq_cli_t *c, int argc, char **argv)
{
    const char *pos[3];
    int yes = 0, rc, n = parse_simple(c, argc, argv, parked_help, pos, 2, &yes, &rc);
    char path[1024], *esc = NULL;

    if (n < 0)
        return rc;
    if (n >= 1 && (!strcmp(pos[0], "replay") || !strcmp(pos[0], "drop"))) {
        int drop = !strcmp(pos[0], "drop");

        if (n != 2) {
            pq_cli_errorf("parked %s: expected a ROUTE (see promptq parked --help)", pos[0]);
            return PQ_CLI_EXIT_USAGE;
        }
        if (drop && !yes) {
            pq_cli_errorf("parked drop deletes the parked jobs of %s for good: add --yes", pos[1]);
            return PQ_CLI_EXIT_USAGE;
        }
        if (!(esc = pq_cli_escape(pos[1])))
            return PQ_CLI_EXIT_FAILED;
        if (drop) {
            snprintf(path, sizeof(path), "/v1/parked/%s", esc);
            rc = simple_call(c, "DELETE", path, NULL, "DELETE /v1/parked/{route}");
        } else {
            snprintf(path, sizeof(path), "/v1/parked/%s/replay", esc);
            rc = simple_call(c, "POST", path, "{}", "POST /v1/parked/{route}/replay");
        }
        curl_free(esc);
        return rc;
    }
    if (yes) {
        pq_cli_errorf("parked: --yes only goes with parked drop");
        return PQ_CLI_EXIT_USAGE;
    }
    if (n > 1) {
        pq_cli_errorf("parked: expected at most one ROUTE (see promptq parked --help)");
        return PQ_CLI_EXIT_USAGE;
    }
    if (n == 1) {
        if (!(esc = pq_cli_escape(pos[0])))
            return PQ_CLI_EXIT_FAILED;
        snprintf(path, sizeof(path), "/v1/parked?route=%s", esc);
        curl_free(esc);
    } else {
        snprintf(path, sizeof(path), "/v1/parked");
    }
    return simple_call(c, "GET", path, NULL, "GET /v1/parked");
}

int pq_cli_cmd_dlq(pq_cli_t *c, int argc, char **argv)
{
    json_t *body = json_object(), *types = json_array(), *ids = json_array();
    const char *v;
    char *text = NULL;
    int rc = PQ_CLI_EXIT_USAGE, only_pos = 0, npos = 0;

    if (!body || !types || !ids) {
        rc = PQ_CLI_EXIT_FAILED;
        goto out;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int k = pq_cli_arg_next(c, argc, argv, &i, &only_pos, dlq_help, &rc);

        if (k == PQ_CLI_ARG_STOP)
            goto out;
        if (k == PQ_CLI_ARG_DONE)
            continue;
        if (k == PQ_CLI_ARG_POS) {
            if (npos++ || strcmp(a, "redrive")) {
                pq_cli_errorf("dlq: expected \"redrive\" (see promptq dlq --help)");
                goto out;
            }
            continue;
        }
        rc = PQ_CLI_EXIT_USAGE;
        if (pq_cli_opt_is(a, "--type") || pq_cli_opt_is(a, "--id")) {
            int is_type = pq_cli_opt_is(a, "--type");

            if (!(v = pq_cli_opt_value(argc, argv, &i, is_type ? "--type" : "--id")))
                goto out;
            json_array_append_new(is_type ? types : ids, json_string(v));
        } else if (pq_cli_opt_is(a, "--route")) {
            if (!(v = pq_cli_opt_value(argc, argv, &i, "--route")))
                goto out;
            json_object_set_new(body, "route", json_string(v));
        } else if (pq_cli_opt_is(a, "--limit")) {
            char *end;
            long n;

            if (!(v = pq_cli_opt_value(argc, argv, &i, "--limit")))
                goto out;
            n = strtol(v, &end, 10);
            if (end == v || *end || n < 1 || n > 10000) {
                pq_cli_errorf("dlq redrive: --limit must be 1 to 10000");
                goto out;
            }
            json_object_set_new(body, "limit", json_integer(n));
        } else {
            pq_cli_errorf("dlq: unknown option %.100s (see promptq dlq --help)", a);
            goto out;
        }
    }
    if (npos != 1) {
        pq_cli_errorf("dlq: expected \"redrive\" (see promptq dlq --help)");
        goto out;
    }
    if (json_array_size(types))
        json_object_set(body, "types", types);
    if (json_array_size(ids))
        json_object_set(body, "ids", ids);
    text = json_dumps(body, JSON_COMPACT);
    rc = text ? simple_call(c, "POST", "/v1/dlq/redrive", text, "POST /v1/dlq/redrive")
              : PQ_CLI_EXIT_FAILED;
out:
    free(text);
    json_decref(body);
    json_decref(types);
    json_decref(ids);
    return rc;
}

int pq_cli_cmd_models(pq_cli_t *c, int argc, char **argv)
{
    const char *pos[1];
    int rc, n = parse_simple(c, argc, argv, models_help, pos, 0, NULL, &rc);
    pq_cli_resp_t r = {0};
    json_t *doc = NULL, *data, *m;
    size_t i;

    if (n < 0)
        return rc;
    pq_cli_resp_reset(&r);
    if (pq_cli_ready(c)) {
        rc = PQ_CLI_EXIT_USAGE;
        goto out;
    }
    if (pq_cli_request(c, "GET", "/v1/models", NULL, 0, NULL, &r) || r.status != 200) {
        rc = pq_cli_report(c, "GET /v1/models", &r);
        goto out;
    }
    doc = pq_cli_resp_json(&r);
    data = json_object_get(doc, "data");
    if (c->json || !json_is_array(data)) {
        if (r.body)
            fwrite(r.body, 1, r.len, stdout);
        fputc('\n', stdout);
    } else {
        json_array_foreach(data, i, m)
        {
            const char *id = json_string_value(json_object_get(m, "id"));

            if (id)
                printf("%s\n", id);
        }
    }
    rc = PQ_CLI_EXIT_OK;
out:
    json_decref(doc);
    pq_cli_resp_reset(&r);
    return rc;
}
