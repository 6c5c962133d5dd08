#include "promptq/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <sys/time.h>

volatile int pq_log_threshold = PQ_LOG_INFO;
static char log_prog[32] = "promptq";
static int log_json;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void pq_log_init(const char *prog, pq_log_level_t level, int json)
{
    if (prog)
        snprintf(log_prog, sizeof(log_prog), "%s", prog);
    pq_log_threshold = level;
    log_json = json;
}

int pq_log_level_parse(const char *s)
{
    for (int i = 0; i < 4; i++)
        if (s && !strcasecmp(s, level_names[i]))
            return i;
    return -1;
}

/* Length of the well-formed UTF-8 sequence at s (RFC 3629: no overlong forms, no surrogates,
 * nothing above U+10FFFF), or 0. */
static size_t utf8_len(const unsigned char *s)
{
    size_t n = s[0] >= 0xF0 ? 4 : s[0] >= 0xE0 ? 3 : 2;
    unsigned lo = 0x80, hi = 0xBF;

    if (s[0] < 0xC2 || s[0] > 0xF4)
        return 0;
    if (s[0] == 0xE0)
        lo = 0xA0;
    else if (s[0] == 0xED)
        hi = 0x9F;
    else if (s[0] == 0xF0)
        lo = 0x90;
    else if (s[0] == 0xF4)
        hi = 0x8F;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xBF)
            return 0;
    return n;
}

/* Appends s to buf as the inside of a JSON string; a byte that is not part of well-formed
 * UTF-8 becomes U+FFFD, so that every line stays valid JSON whatever a message quotes. */
static size_t json_escape(char *buf, size_t size, size_t off, const char *s)
{
    while (*s && off + 7 < size) {
        unsigned char c = (unsigned char)*s;
        size_t n;

        if (c == '"' || c == '\\') {
            buf[off++] = '\\';
            buf[off++] = (char)c;
            s++;
        } else if (c < 0x20) {
            off += (size_t)snprintf(buf + off, size - off, "\\u%04x", c);
            s++;
        } else if (c < 0x80) {
            buf[off++] = (char)c;
            s++;
        } else if ((n = utf8_len((const unsigned char *)s)) > 0) {
            memcpy(buf + off, s, n);
            off += n;
            s += n;
        } else {
            off += (size_t)snprintf(buf + off, size - off, "\\ufffd");
            s++;
        }
    }
    return off;
}

void pq_log_write(pq_log_level_t level, const char *func, int line, const char *fmt, ...)
{
    char msg[2048], out[4608];
    struct timeval tv;
    struct tm tm;
    char ts[40];
    va_list ap;
    size_t off;
    int n;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);

    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    n = (int)strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + n, sizeof(ts) - (size_t)n, ".%03dZ", (int)(tv.tv_usec / 1000));

    if (log_json) {
        n = snprintf(out, sizeof(out),
                     "{\"ts\":\"%s\",\"level\":\"%s\",\"prog\":\"%s\",\"pid\":%d,\"at\":\"%s:%d\","
                     "\"msg\":\"",
                     ts, level_names[level & 3], log_prog, (int)getpid(), func, line);
        off = json_escape(out, sizeof(out) - 3, (size_t)n, msg);
        memcpy(out + off, "\"}\n", 3);
        off += 3;
    } else {
        n = snprintf(out, sizeof(out), "%s %s[%d] %-5s %s: %s\n", ts, log_prog, (int)getpid(),
                     level_names[level & 3], func, msg);
        off = (size_t)n < sizeof(out) ? (size_t)n : sizeof(out) - 1;
        if (off == sizeof(out) - 1)
            out[off - 1] = '\n';
    }
    /* One write per line keeps lines from different threads whole. */
    ssize_t w = write(STDERR_FILENO, out, off);
    (void)w;
}
