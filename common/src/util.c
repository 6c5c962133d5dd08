#include "promptq/util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>

int64_t pq_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t pq_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void pq_time_format(int64_t ms, char *buf, size_t size)
{
    time_t sec = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&sec, &tm);
    snprintf(buf, size, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
}

static int digits(const char *s, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 0;
}

int pq_time_parse(const char *s, int64_t *ms)
{
    int y, mo, d, h, mi, sec, frac_ms = 0, off_min = 0;
    const char *p;
    struct tm tm;

    if (!s || strlen(s) < 20)
        return -1;
    if (digits(s, 4, &y) || s[4] != '-' || digits(s + 5, 2, &mo) || s[7] != '-' ||
        digits(s + 8, 2, &d) || (s[10] != 'T' && s[10] != 't' && s[10] != ' ') ||
        digits(s + 11, 2, &h) || s[13] != ':' || digits(s + 14, 2, &mi) || s[16] != ':' ||
        digits(s + 17, 2, &sec))
        return -1;
    if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60)
        return -1;
    p = s + 19;
    if (*p == '.') {
        int scale = 100, n = 0;
        for (p++; *p >= '0' && *p <= '9'; p++, n++) {
            frac_ms += (*p - '0') * scale;
            scale /= 10;
        }
        if (n == 0)
            return -1;
    }
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int oh, om;
        if (digits(p + 1, 2, &oh) || p[3] != ':' || digits(p + 4, 2, &om) || oh > 23 || om > 59)
            return -1;
        off_min = (oh * 60 + om) * (*p == '-' ? -1 : 1);
        p += 6;
    } else {
        return -1;
    }
    if (*p)
        return -1;
    memset(&tm, 0, sizeof(tm));
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = sec;
    *ms = ((int64_t)timegm(&tm) - (int64_t)off_min * 60) * 1000 + frac_ms;
    return 0;
}

size_t pq_strlcpy(char *dst, const char *src, size_t size)
{
    size_t n = strlen(src);
    if (size > 0) {
        size_t c = n < size - 1 ? n : size - 1;
        memcpy(dst, src, c);
        dst[c] = '\0';
    }
    return n;
}

char *pq_file_read(const char *path, size_t max, size_t *len)
{
    FILE *f = fopen(path, "rb");
    struct stat st;
    char *buf = NULL;
    size_t n;

    if (!f)
        return NULL;
    if (fstat(fileno(f), &st) != 0)
        goto out_close;
    if ((size_t)st.st_size > max) {
        errno = EFBIG;
        goto out_close;
    }
    buf = malloc((size_t)st.st_size + 1);
    if (!buf)
        goto out_close;
    n = fread(buf, 1, (size_t)st.st_size, f);
    buf[n] = '\0';
    if (len)
        *len = n;
out_close:
    fclose(f);
    return buf;
}

int64_t pq_backoff_step_ms(int64_t base, int64_t max, int n)
{
    int64_t d = base;

    for (int i = 1; i < n && d < max; i++)
        d *= 2;
    return d > max ? max : d;
}
