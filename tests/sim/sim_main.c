/* promptq-sim: provider simulator (see sim.h and DESIGN.md §7). */
#include "sim.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "promptq/log.h"

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: promptq-sim --listen HOST:PORT [--control HOST:PORT] [--name NAME]\n"
        "                   [--key KEY]... [--log-level debug|info|warn|error]\n"
        "\n"
        "Simulates an LLM provider on --listen: OpenAI (/v1/chat/completions, /v1/models),\n"
        "Azure OpenAI (/openai/deployments/D/chat/completions?api-version=V), Anthropic\n"
        "(/v1/messages), Gemini (/v1beta/models/M:generateContent), watsonx (/identity/token,\n"
        "/ml/v1/text/chat?version=V). Answers \"echo: \" + the last message's text.\n"
        "Control API (also on --listen while it is up):\n"
        "  POST /_sim/state  {\"mode\":\"ok|down|error|rate_limit|hang|malformed|reset|stall\",\n"
        "                     \"status\":500, \"retry_after\":\"1\" (null or \"\": none),\n"
        "                     \"retry_after_ms\":N, \"latency_ms\":0, \"failure_rate\":0.0,\n"
        "                     \"error_body\":\"...\", \"error_code\":\"...\", "
        "\"error_message\":\"...\",\n"
        "                     \"schedule\":{\"period_ms\":N, \"down_ms\":M, \"down\":{STATE}},\n"
        "                     \"models\":{\"MODEL\":{STATE}}, \"revoke_tokens\":false,\n"
        "                     \"chunk_ms\":0, \"stream_cut_after\":0, "
        "\"stream_malformed_at\":0,\n"
        "                     \"stream_no_done\":false, \"reject_prefill\":false}\n"
        "                    replaces the whole state (absent fields: defaults)\n"
        "  GET  /_sim/state, GET /_sim/stats, GET /_sim/log (last 1000 chat calls),\n"
        "  POST /_sim/reset (zeroes the stats, clears the log)\n"
        "A chat call for MODEL meets models.MODEL (else the top-level state); schedule: the\n"
        "first down_ms of every period_ms the down state applies. reset closes without an\n"
        "answer; stall sends headers and half a body. error_code: the format's own error\n"
        "document with that code (error_body wins). down: top level only.\n"
        "down closes --listen (refused; held calls reset), any other mode re-binds it.\n"
        "A new state answers hanging calls (finishes stalled ones) that it no longer holds.\n"
        "Streams (SSE, one event per word) when asked: \"stream\": true (OpenAI, Azure,\n"
        "Anthropic, watsonx), /ml/v1/text/chat_stream, Gemini M:streamGenerateContent?alt=sse.\n"
        "chunk_ms: delay between events (0: all at once); stream_cut_after N: close after the\n"
        "Nth event; stream_malformed_at N: the Nth event is not JSON; stream_no_done: no\n"
        "[DONE] / message_stop. A trailing assistant message is a prefill the answer continues;\n"
        "reject_prefill: such a request is a 400.\n"
        "Prints \"listening=HOST:PORT control=HOST:PORT\" once bound (port 0: any).\n"
        "--key (repeatable): requests must carry one of the keys in the format's header.\n");
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    PQ_INFO("signal %d: exiting", (int)sig);
    event_base_loopbreak(arg);
}

/* Thousands of concurrent connections need more than the usual 1024 descriptors. */
static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv)
{
    pq_sim_opts_t opts;
    struct event_base *base = NULL;
    struct event_config *cfg;
    struct event *ev_term = NULL, *ev_int = NULL;
    pq_sim_t *sim = NULL;
    char err[512];
    int level = PQ_LOG_INFO, rc = 2;

    memset(&opts, 0, sizeof(opts));
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        if (!v) {
            fprintf(stderr, "promptq-sim: %s: missing value or unknown flag\n", a);
            usage(stderr);
            return 2;
        }
        if (!strcmp(a, "--listen")) {
            opts.listen = v;
        } else if (!strcmp(a, "--control")) {
            opts.control = v;
        } else if (!strcmp(a, "--name")) {
            opts.name = v;
        } else if (!strcmp(a, "--key")) {
            if (opts.nkeys == PQ_SIM_MAX_API_KEYS) {
                fprintf(stderr, "promptq-sim: at most %d --key\n", PQ_SIM_MAX_API_KEYS);
                return 2;
            }
            opts.keys[opts.nkeys++] = v;
        } else if (!strcmp(a, "--log-level")) {
            level = pq_log_level_parse(v);
            if (level < 0) {
                fprintf(stderr, "promptq-sim: --log-level %s: unknown level\n", v);
                return 2;
            }
        } else {
            fprintf(stderr, "promptq-sim: %s: unknown flag\n", a);
            usage(stderr);
            return 2;
        }
        i++;
    }
    if (!opts.listen) {
        fprintf(stderr, "promptq-sim: --listen HOST:PORT is required\n");
        usage(stderr);
        return 2;
    }
    pq_log_init(opts.name ? opts.name : "promptq-sim", (pq_log_level_t)level, 0);
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();

    /* The changelist folds evhttp's per-request enable/disable pairs into fewer epoll_ctl calls. */
    cfg = event_config_new();
    if (cfg) {
        event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
        base = event_base_new_with_config(cfg);
        event_config_free(cfg);
    }
    if (!base)
        base = event_base_new();
    if (!base) {
        fprintf(stderr, "promptq-sim: event_base_new failed\n");
        return 1;
    }
    ev_term = evsignal_new(base, SIGTERM, on_signal, base);
    ev_int = evsignal_new(base, SIGINT, on_signal, base);
    if (!ev_term || !ev_int || evsignal_add(ev_term, NULL) || evsignal_add(ev_int, NULL)) {
        fprintf(stderr, "promptq-sim: cannot watch signals\n");
        rc = 1;
        goto out_free_base;
    }
    sim = pq_sim_new(base, &opts, err, sizeof(err));
    if (!sim) {
        fprintf(stderr, "promptq-sim: %s\n", err);
        rc = 1;
        goto out_free_base;
    }
    event_base_dispatch(base);
    rc = 0;
    pq_sim_destroy(sim);
out_free_base:
    if (ev_term)
        event_free(ev_term);
    if (ev_int)
        event_free(ev_int);
    event_base_free(base);
    return rc;
}
