/* promptq-devkafka: librdkafka's in-process mock Kafka cluster on 127.0.0.1 for development and
 * tests.
 *
 * Startup: creates the mock cluster (--brokers N), the topics <prefix>requests, <prefix>bulk,
 * <prefix>results, <prefix>dlq and every --topic NAME with --partitions N partitions and
 * replication factor min(brokers, 3), prints "bootstrap=host:port,..." as the first stdout line
 * and then writes --bootstrap-file atomically.
 *
 * Control: one command per stdin line, one answer line ("ok ..." or "error: ...") per command on
 * stdout. End of stdin is not a reason to exit; SIGTERM and SIGINT are (exit status 0).
 *
 * Notes on librdkafka 2.0.2's mock cluster (what this program relies on or works around):
 * - Listeners bind 127.0.0.1 on ephemeral ports (rd_kafka_mock_cluster_new).
 * - The mock does not implement CreateTopics (Admin API); clients that ask for metadata of an
 *   unknown topic with allow.auto.create.topics get it auto-created with the cluster's default
 *   partition count (4) and replication factor min(3, brokers). There is no property or API to
 *   change that default; devkafka_autocreate_partitions() below patches it in place for 2.0.2.
 * - Each partition keeps at most about 5 MB (and 100000 message sets); older message sets are
 *   dropped and the log start offset moves forward.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "promptq/log.h"

#define DK_MAX_BROKERS    64
#define DK_MAX_PARTITIONS 10000
#define DK_MAX_TOPICS     256
#define DK_MAX_ERRCNT     100000
#define DK_MAX_API_KEY    100
#define DK_MAX_RTT_MS     600000
#define DK_LINE_MAX       1024
#define DK_TOPIC_NAME_MAX 249
#define DK_MOCK_OP_GAP_NS (5 * 1000 * 1000)

typedef struct devkafka_opts_s {
    int brokers;
    int partitions;
    const char *prefix;
    const char *bootstrap_file;
    const char *topics[DK_MAX_TOPICS]; /* borrowed from argv */
    int topic_cnt;
    int log_level;
} devkafka_opts_t;

typedef struct devkafka_s {
    devkafka_opts_t opts;
    rd_kafka_t *rk;
    rd_kafka_mock_cluster_t *mcluster; /* owned, destroyed before rk */
    int replication_factor;
    struct timespec last_op; /* when the last mock control op returned */
} devkafka_t;

static volatile sig_atomic_t devkafka_stop;

static void devkafka_on_signal(int sig)
{
    devkafka_stop = sig;
}

static void devkafka_usage(FILE *fp)
{
    fprintf(fp,
            "usage: promptq-devkafka [options]\n"
            "\n"
            "Runs librdkafka's mock Kafka cluster on 127.0.0.1 for development and tests.\n"
            "\n"
            "options:\n"
            "  --brokers N            number of brokers, ids 1..N (default 1)\n"
            "  --partitions N         partitions of every topic it creates, also of topics\n"
            "                         auto-created by clients (default 4)\n"
            "  --topic-prefix P       prefix of the standard topics (default \"promptq.\"):\n"
            "                         Prequests, Pbulk, Presults, Pdlq\n"
            "  --topic NAME           create one more topic (repeatable)\n"
            "  --bootstrap-file PATH  write \"host:port,...\\n\" there atomically once the\n"
            "                         topics exist\n"
            "  --log-level L          debug, info, warn, error (default info)\n"
            "  -h, --help             this text\n"
            "\n"
            "The first stdout line is \"bootstrap=host:port,...\". Then one command per stdin\n"
            "line, each answered by one stdout line, \"ok ...\" or \"error: ...\":\n"
            "  down B | up B          broker B (1..N, or -1 for all) refuses / accepts again\n"
            "  rtt B MS               broker B answers after MS milliseconds (0 = none)\n"
            "  err APIKEY COUNT CODE  the next COUNT requests of APIKEY (0 = Produce, 1 = Fetch,\n"
            "                         3 = Metadata, ...) fail with error CODE\n"
            "  clear APIKEY           drop pending injected errors of APIKEY\n"
            "  topic NAME [PARTS]     create a topic (default --partitions)\n"
            "  ping                   answers \"ok pong\"\n"
            "  help                   lists the commands\n"
            "End of stdin does not stop it; SIGTERM and SIGINT do (exit status 0).\n");
}

/* Parses a whole decimal int in [min, max]; returns 0 or -1. Pure. */
static int devkafka_parse_int(const char *s, long min, long max, int *out)
{
    char *end;
    long v;

    if (!s || !*s)
        return -1;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || v < min || v > max)
        return -1;
    *out = (int)v;
    return 0;
}

/* Kafka's legal topic names: 1..249 of [a-zA-Z0-9._-], not "." or "..". Pure. */
static int devkafka_topic_name_ok(const char *name)
{
    size_t len = strlen(name);

    if (len == 0 || len > DK_TOPIC_NAME_MAX || !strcmp(name, ".") || !strcmp(name, ".."))
        return 0;
    for (const char *p = name; *p; p++) {
        char c = *p;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

/* Returns 0 to run, 1 to exit 0 (help), 2 to exit 2 (usage error, already reported). */
static int devkafka_parse_args(int argc, char **argv, devkafka_opts_t *o)
{
    o->brokers = 1;
    o->partitions = 4;
    o->prefix = "promptq.";
    o->bootstrap_file = NULL;
    o->topic_cnt = 0;
    o->log_level = PQ_LOG_INFO;

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *val = NULL;
        char name[64];
        const char *eq;

        if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
            devkafka_usage(stdout);
            return 1;
        }
        if (strncmp(arg, "--", 2) != 0) {
            fprintf(stderr, "promptq-devkafka: unexpected argument '%s' (see --help)\n", arg);
            return 2;
        }
        /* --name=value or --name value */
        eq = strchr(arg, '=');
        if (eq) {
            size_t n = (size_t)(eq - arg);
            if (n >= sizeof(name))
                n = sizeof(name) - 1;
            memcpy(name, arg, n);
            name[n] = '\0';
            val = eq + 1;
        } else {
            snprintf(name, sizeof(name), "%s", arg);
        }

        if (strcmp(name, "--brokers") && strcmp(name, "--partitions") &&
            strcmp(name, "--topic-prefix") && strcmp(name, "--topic") &&
            strcmp(name, "--bootstrap-file") && strcmp(name, "--log-level")) {
            fprintf(stderr, "promptq-devkafka: unknown option '%s' (see --help)\n", arg);
            return 2;
        }
        if (!val) {
            if (i + 1 >= argc) {
                fprintf(stderr, "promptq-devkafka: option '%s' needs a value\n", name);
                return 2;
            }
            val = argv[++i];
        }

        if (!strcmp(name, "--brokers")) {
            if (devkafka_parse_int(val, 1, DK_MAX_BROKERS, &o->brokers)) {
                fprintf(stderr, "promptq-devkafka: --brokers wants 1..%d, not '%s'\n",
                        DK_MAX_BROKERS, val);
                return 2;
            }
        } else if (!strcmp(name, "--partitions")) {
            if (devkafka_parse_int(val, 1, DK_MAX_PARTITIONS, &o->partitions)) {
                fprintf(stderr, "promptq-devkafka: --partitions wants 1..%d, not '%s'\n",
                        DK_MAX_PARTITIONS, val);
                return 2;
            }
        } else if (!strcmp(name, "--topic-prefix")) {
            if (strlen(val) > 200) {
                fprintf(stderr, "promptq-devkafka: --topic-prefix is too long\n");
                return 2;
            }
            o->prefix = val;
        } else if (!strcmp(name, "--topic")) {
            if (!devkafka_topic_name_ok(val)) {
                fprintf(stderr, "promptq-devkafka: --topic '%s' is not a legal topic name\n", val);
                return 2;
            }
            if (o->topic_cnt >= DK_MAX_TOPICS) {
                fprintf(stderr, "promptq-devkafka: at most %d --topic options\n", DK_MAX_TOPICS);
                return 2;
            }
            o->topics[o->topic_cnt++] = val;
        } else if (!strcmp(name, "--bootstrap-file")) {
            if (!*val) {
                fprintf(stderr, "promptq-devkafka: --bootstrap-file needs a path\n");
                return 2;
            }
            o->bootstrap_file = val;
        } else { /* --log-level */
            int lvl = pq_log_level_parse(val);
            if (lvl < 0) {
                fprintf(stderr, "promptq-devkafka: --log-level wants debug|info|warn|error\n");
                return 2;
            }
            o->log_level = lvl;
        }
    }
    return 0;
}

/* Writes one answer line to stdout and flushes it. A closed stdout is ignored (SIGPIPE is). */
static void devkafka_reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void devkafka_reply(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    if (fflush(stdout) != 0)
        clearerr(stdout);
}

static void devkafka_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    /* syslog levels: 0..3 error, 4 warning, 5..6 info, 7 debug */
    if (level <= 3)
        PQ_ERR("rdkafka %s: %s", fac, buf);
    else if (level == 4)
        PQ_WARN("rdkafka %s: %s", fac, buf);
    else if (level <= 6)
        PQ_INFO("rdkafka %s: %s", fac, buf);
    else
        PQ_DBG("rdkafka %s: %s", fac, buf);
}

/* librdkafka 2.0.2 has no property or API for the partition count of topics that clients
 * auto-create (Metadata for an unknown topic): rd_kafka_mock_cluster_new() sets the cluster's
 * defaults to partition_cnt = 4 and replication_factor = min(3, brokers), stored as two ints at
 * byte offsets 0xe8 and 0xec of the opaque cluster struct (read off the disassembly of Debian's
 * librdkafka1 2.0.2-1). Only when the library is exactly 2.0.2 and both ints hold exactly those
 * values is the partition count replaced. Call before any client connects; the later topic
 * creation ops (mutex-protected queue) publish the store to the mock thread.
 * Returns 0 when patched, -1 when left at the library default. */
static int devkafka_autocreate_partitions(rd_kafka_mock_cluster_t *mc, int brokers, int parts)
{
    const size_t off = 0xe8;
    int defaults[2];

    if (rd_kafka_version() != 0x020002ff)
        return -1;
    memcpy(defaults, (const char *)mc + off, sizeof(defaults));
    if (defaults[0] != 4 || defaults[1] != (brokers < 3 ? brokers : 3))
        return -1;
    defaults[0] = parts;
    memcpy((char *)mc + off, defaults, sizeof(defaults[0]));
    return 0;
}

/* librdkafka 2.0.2's mock thread sometimes misses the wake-up of a control op (topic create,
 * broker down/up, rtt, errors, destroy) issued right after the previous one returned, and then
 * serves it only at its next 1 s poll timeout. Keeping DK_MOCK_OP_GAP_NS between ops avoids
 * that in practice (measured: 1-3 of 10 back-to-back runs hit a 1 s stall, none with the gap). */
static void devkafka_op_gap(devkafka_t *dk)
{
    struct timespec now, wait;
    int64_t elapsed;

    clock_gettime(CLOCK_MONOTONIC, &now);
    elapsed = (int64_t)(now.tv_sec - dk->last_op.tv_sec) * 1000000000 +
              (now.tv_nsec - dk->last_op.tv_nsec);
    if (elapsed >= 0 && elapsed < DK_MOCK_OP_GAP_NS) {
        wait.tv_sec = 0;
        wait.tv_nsec = (long)(DK_MOCK_OP_GAP_NS - elapsed);
        while (nanosleep(&wait, &wait) != 0 && errno == EINTR)
            ;
    }
}

static void devkafka_op_done(devkafka_t *dk)
{
    clock_gettime(CLOCK_MONOTONIC, &dk->last_op);
}

static rd_kafka_resp_err_t devkafka_topic_create(devkafka_t *dk, const char *name, int parts)
{
    rd_kafka_resp_err_t err;

    devkafka_op_gap(dk);
    err = rd_kafka_mock_topic_create(dk->mcluster, name, parts, dk->replication_factor);
    devkafka_op_done(dk);
    if (err)
        PQ_WARN("topic %s: %s", name, rd_kafka_err2str(err));
    else
        PQ_INFO("topic %s: %d partitions, replication factor %d", name, parts,
                dk->replication_factor);
    return err;
}

/* Creates the standard and the extra topics; duplicates are created once. */
static int devkafka_topics_create(devkafka_t *dk)
{
    static const char *const std_suffix[] = {"requests", "bulk", "results", "dlq"};
    char names[4][DK_TOPIC_NAME_MAX + 1];
    const char *all[4 + DK_MAX_TOPICS];
    int n = 0;

    for (size_t i = 0; i < 4; i++) {
        snprintf(names[i], sizeof(names[i]), "%s%s", dk->opts.prefix, std_suffix[i]);
        if (!devkafka_topic_name_ok(names[i])) {
            PQ_ERR("'%s' is not a legal topic name (check --topic-prefix)", names[i]);
            return -1;
        }
        all[n++] = names[i];
    }
    for (int i = 0; i < dk->opts.topic_cnt; i++)
        all[n++] = dk->opts.topics[i];

    for (int i = 0; i < n; i++) {
        int dup = 0;
        for (int j = 0; j < i && !dup; j++)
            dup = !strcmp(all[i], all[j]);
        if (!dup && devkafka_topic_create(dk, all[i], dk->opts.partitions))
            return -1;
    }
    return 0;
}

/* Writes "bootstraps\n" to path via a temporary file, fsync and rename. */
static int devkafka_bootstrap_file_write(const char *path, const char *bootstraps)
{
    char tmp[PATH_MAX];
    size_t len = strlen(bootstraps);
    char *buf = NULL;
    int fd = -1, rc = -1;
    ssize_t w;

    if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid()) >= sizeof(tmp)) {
        PQ_ERR("--bootstrap-file path is too long");
        return -1;
    }
    buf = malloc(len + 1);
    if (!buf)
        goto out;
    memcpy(buf, bootstraps, len);
    buf[len] = '\n';

    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        PQ_ERR("open %s: %s", tmp, strerror(errno));
        goto out_free_buf;
    }
    for (size_t off = 0; off < len + 1; off += (size_t)w) {
        w = write(fd, buf + off, len + 1 - off);
        if (w < 0 && errno == EINTR) {
            w = 0;
            continue;
        }
        if (w < 0) {
            PQ_ERR("write %s: %s", tmp, strerror(errno));
            goto out_unlink;
        }
    }
    if (fsync(fd) != 0) {
        PQ_ERR("fsync %s: %s", tmp, strerror(errno));
        goto out_unlink;
    }
    if (close(fd) != 0) {
        fd = -1;
        PQ_ERR("close %s: %s", tmp, strerror(errno));
        goto out_unlink;
    }
    fd = -1;
    if (rename(tmp, path) != 0) {
        PQ_ERR("rename %s -> %s: %s", tmp, path, strerror(errno));
        goto out_unlink;
    }
    rc = 0;
    goto out_free_buf;

out_unlink:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
out_free_buf:
    free(buf);
out:
    return rc;
}

/* Splits line (modified in place) into at most max whitespace-separated words. Returns the word
 * count, or max + 1 when there are more. */
static int devkafka_split(char *line, char **words, int max)
{
    int n = 0;
    char *save = NULL;

    for (char *w = strtok_r(line, " \t\r", &save); w; w = strtok_r(NULL, " \t\r", &save)) {
        if (n == max)
            return max + 1;
        words[n++] = w;
    }
    return n;
}

/* Checks a broker argument: 1..brokers or -1. */
static int devkafka_broker_arg(devkafka_t *dk, const char *s, int *id)
{
    if (devkafka_parse_int(s, -1, dk->opts.brokers, id) || *id == 0) {
        devkafka_reply("error: broker must be 1..%d or -1, not '%s'", dk->opts.brokers, s);
        return -1;
    }
    return 0;
}

static void devkafka_cmd_err(devkafka_t *dk, char **w)
{
    int api, cnt, code;
    rd_kafka_resp_err_t *errs;

    if (devkafka_parse_int(w[1], 0, DK_MAX_API_KEY, &api)) {
        devkafka_reply("error: APIKEY must be 0..%d, not '%s'", DK_MAX_API_KEY, w[1]);
        return;
    }
    if (devkafka_parse_int(w[2], 1, DK_MAX_ERRCNT, &cnt)) {
        devkafka_reply("error: COUNT must be 1..%d, not '%s'", DK_MAX_ERRCNT, w[2]);
        return;
    }
    if (devkafka_parse_int(w[3], -200, 32767, &code)) {
        devkafka_reply("error: CODE must be a Kafka error code (e.g. 7), not '%s'", w[3]);
        return;
    }
    errs = malloc(sizeof(*errs) * (size_t)cnt);
    if (!errs) {
        devkafka_reply("error: out of memory");
        return;
    }
    for (int i = 0; i < cnt; i++)
        errs[i] = (rd_kafka_resp_err_t)code;
    devkafka_op_gap(dk);
    rd_kafka_mock_push_request_errors_array(dk->mcluster, (int16_t)api, (size_t)cnt, errs);
    devkafka_op_done(dk);
    free(errs);
    PQ_INFO("next %d requests of api key %d fail with %d (%s)", cnt, api, code,
            rd_kafka_err2name((rd_kafka_resp_err_t)code));
    devkafka_reply("ok err %d %d %d", api, cnt, code);
}

/* Executes one control line (NUL-terminated, without the newline; modified in place). */
static void devkafka_command(devkafka_t *dk, char *line)
{
    char *w[5];
    int n = devkafka_split(line, w, 4);
    int id, ms, parts;
    rd_kafka_resp_err_t err;

    if (n == 0 || w[0][0] == '#')
        return; /* blank lines and comments get no answer */

    if (!strcmp(w[0], "down") || !strcmp(w[0], "up")) {
        int down = w[0][0] == 'd';
        if (n != 2) {
            devkafka_reply("error: usage: %s B", w[0]);
            return;
        }
        if (devkafka_broker_arg(dk, w[1], &id))
            return;
        devkafka_op_gap(dk);
        err = down ? rd_kafka_mock_broker_set_down(dk->mcluster, id)
                   : rd_kafka_mock_broker_set_up(dk->mcluster, id);
        devkafka_op_done(dk);
        if (err) {
            devkafka_reply("error: %s %d: %s", w[0], id, rd_kafka_err2str(err));
            return;
        }
        PQ_INFO("broker %d %s", id, down ? "down" : "up");
        devkafka_reply("ok %s %d", w[0], id);
    } else if (!strcmp(w[0], "rtt")) {
        if (n != 3) {
            devkafka_reply("error: usage: rtt B MS");
            return;
        }
        if (devkafka_broker_arg(dk, w[1], &id))
            return;
        if (devkafka_parse_int(w[2], 0, DK_MAX_RTT_MS, &ms)) {
            devkafka_reply("error: MS must be 0..%d, not '%s'", DK_MAX_RTT_MS, w[2]);
            return;
        }
        devkafka_op_gap(dk);
        err = rd_kafka_mock_broker_set_rtt(dk->mcluster, id, ms);
        devkafka_op_done(dk);
        if (err) {
            devkafka_reply("error: rtt %d: %s", id, rd_kafka_err2str(err));
            return;
        }
        PQ_INFO("broker %d rtt %d ms", id, ms);
        devkafka_reply("ok rtt %d %d", id, ms);
    } else if (!strcmp(w[0], "err")) {
        if (n != 4) {
            devkafka_reply("error: usage: err APIKEY COUNT CODE");
            return;
        }
        devkafka_cmd_err(dk, w);
    } else if (!strcmp(w[0], "clear")) {
        if (n != 2 || devkafka_parse_int(w[1], 0, DK_MAX_API_KEY, &id)) {
            devkafka_reply("error: usage: clear APIKEY (0..%d)", DK_MAX_API_KEY);
            return;
        }
        devkafka_op_gap(dk);
        rd_kafka_mock_clear_request_errors(dk->mcluster, (int16_t)id);
        devkafka_op_done(dk);
        devkafka_reply("ok clear %d", id);
    } else if (!strcmp(w[0], "topic")) {
        if (n != 2 && n != 3) {
            devkafka_reply("error: usage: topic NAME [PARTITIONS]");
            return;
        }
        if (!devkafka_topic_name_ok(w[1])) {
            devkafka_reply("error: '%s' is not a legal topic name", w[1]);
            return;
        }
        parts = dk->opts.partitions;
        if (n == 3 && devkafka_parse_int(w[2], 1, DK_MAX_PARTITIONS, &parts)) {
            devkafka_reply("error: PARTITIONS must be 1..%d, not '%s'", DK_MAX_PARTITIONS, w[2]);
            return;
        }
        err = devkafka_topic_create(dk, w[1], parts);
        if (err) {
            devkafka_reply("error: topic %s: %s", w[1], rd_kafka_err2str(err));
            return;
        }
        devkafka_reply("ok topic %s %d", w[1], parts);
    } else if (!strcmp(w[0], "ping")) {
        devkafka_reply("ok pong");
    } else if (!strcmp(w[0], "help")) {
        devkafka_reply("ok commands: down B, up B, rtt B MS, err APIKEY COUNT CODE, "
                       "clear APIKEY, topic NAME [PARTITIONS], ping, help");
    } else {
        devkafka_reply("error: unknown command '%.64s' (try help)", w[0]);
    }
}

/* Serves control lines until SIGTERM/SIGINT. SIGTERM and SIGINT are blocked except inside
 * ppoll(), so a signal can never slip in between the flag check and the wait. */
static void devkafka_serve(devkafka_t *dk, const sigset_t *waitmask)
{
    char buf[DK_LINE_MAX];
    size_t len = 0;
    int discarding = 0; /* inside an over-long line */
    int stdin_open = 1;

    while (!devkafka_stop) {
        struct pollfd pfd = {.fd = STDIN_FILENO, .events = POLLIN};
        struct timespec ts = {.tv_sec = 1, .tv_nsec = 0};
        int r = ppoll(&pfd, stdin_open ? 1 : 0, &ts, waitmask);
        ssize_t got;

        rd_kafka_poll(dk->rk, 0);
        if (r < 0) {
            if (errno != EINTR)
                PQ_WARN("ppoll: %s", strerror(errno));
            continue;
        }
        if (r == 0 || !stdin_open)
            continue;

        got = read(STDIN_FILENO, buf + len, sizeof(buf) - 1 - len);
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            PQ_WARN("stdin: %s; no more control commands", strerror(errno));
            stdin_open = 0;
            continue;
        }
        if (got == 0) {
            PQ_INFO("stdin closed; still serving until SIGTERM");
            stdin_open = 0;
            if (len > 0 && !discarding) { /* last line without a newline */
                buf[len] = '\0';
                devkafka_command(dk, buf);
            }
            len = 0;
            continue;
        }
        len += (size_t)got;

        /* Execute every complete line, keep the tail. */
        for (;;) {
            char *nl = memchr(buf, '\n', len);
            size_t used;
            if (!nl)
                break;
            *nl = '\0';
            used = (size_t)(nl - buf) + 1;
            if (discarding) {
                devkafka_reply("error: line longer than %d bytes", DK_LINE_MAX - 1);
                discarding = 0;
            } else if (memchr(buf, '\0', (size_t)(nl - buf))) {
                devkafka_reply("error: NUL byte in command");
            } else {
                devkafka_command(dk, buf);
            }
            memmove(buf, buf + used, len - used);
            len -= used;
        }
        if (len == sizeof(buf) - 1) { /* full and no newline: drop until the next one */
            discarding = 1;
            len = 0;
        }
    }
}

int main(int argc, char **argv)
{
    devkafka_t dk;
    rd_kafka_conf_t *conf;
    char errstr[512];
    const char *bootstraps;
    struct sigaction sa;
    sigset_t block, waitmask;
    int rc = 1;

    memset(&dk, 0, sizeof(dk));
    switch (devkafka_parse_args(argc, argv, &dk.opts)) {
    case 1:
        return 0;
    case 2:
        return 2;
    default:
        break;
    }
    pq_log_init("promptq-devkafka", (pq_log_level_t)dk.opts.log_level, 0);
    dk.replication_factor = dk.opts.brokers < 3 ? dk.opts.brokers : 3;

    /* Signals: handlers without SA_RESTART; SIGTERM/SIGINT stay blocked (also in librdkafka's
     * threads, which inherit the mask) except while ppoll() waits. */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = devkafka_on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &waitmask);
    sigdelset(&waitmask, SIGTERM);
    sigdelset(&waitmask, SIGINT);

    /* A file left by an earlier run must not look like readiness. */
    if (dk.opts.bootstrap_file && unlink(dk.opts.bootstrap_file) != 0 && errno != ENOENT)
        PQ_WARN("unlink %s: %s", dk.opts.bootstrap_file, strerror(errno));

    conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, devkafka_log_cb);
    if (rd_kafka_conf_set(conf, "client.id", "promptq-devkafka", errstr, sizeof(errstr)) !=
        RD_KAFKA_CONF_OK) {
        PQ_ERR("conf: %s", errstr);
        rd_kafka_conf_destroy(conf);
        goto out;
    }
    /* The handle only hosts the cluster; it has no bootstrap servers and never connects. */
    dk.rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!dk.rk) {
        PQ_ERR("rd_kafka_new: %s", errstr);
        rd_kafka_conf_destroy(conf);
        goto out;
    }
    dk.mcluster = rd_kafka_mock_cluster_new(dk.rk, dk.opts.brokers);
    if (!dk.mcluster) {
        PQ_ERR("could not create the mock cluster (see rdkafka log lines above)");
        goto out_destroy_rk;
    }
    bootstraps = rd_kafka_mock_cluster_bootstraps(dk.mcluster);

    if (devkafka_autocreate_partitions(dk.mcluster, dk.opts.brokers, dk.opts.partitions) == 0)
        PQ_INFO("auto-created topics get %d partitions", dk.opts.partitions);
    else if (dk.opts.partitions != 4)
        PQ_WARN("librdkafka %s: cannot change the auto-create partition count; topics that "
                "clients auto-create get 4 partitions (use --topic or 'topic NAME')",
                rd_kafka_version_str());

    if (devkafka_topics_create(&dk) != 0)
        goto out_destroy_cluster;

    devkafka_reply("bootstrap=%s", bootstraps);
    if (dk.opts.bootstrap_file &&
        devkafka_bootstrap_file_write(dk.opts.bootstrap_file, bootstraps) != 0)
        goto out_destroy_cluster;
    PQ_INFO("mock cluster up: %d broker(s), %d partitions per topic, bootstrap %s", dk.opts.brokers,
            dk.opts.partitions, bootstraps);

    devkafka_serve(&dk, &waitmask);
    PQ_INFO("signal %d: shutting down", (int)devkafka_stop);
    rc = 0;

out_destroy_cluster:
    devkafka_op_gap(&dk);
    rd_kafka_mock_cluster_destroy(dk.mcluster);
    PQ_DBG("mock cluster destroyed");
out_destroy_rk:
    rd_kafka_destroy(dk.rk);
    PQ_DBG("client handle destroyed");
out:
    return rc;
}
