/* multipart/form-data for POST /v1/files (multipart.h): pure, no I/O, fuzzed
 * (tests/fuzz/fuzz_multipart.c). */
#include "multipart.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

/* Finds the parameter name="..." (or filename="...") in a part's headers. */
static int header_param(const char *h, size_t hlen, const char *param, const char **v, size_t *vlen)
{
    size_t plen = strlen(param);

    for (size_t i = 0; i + plen + 2 <= hlen; i++) {
        if ((i == 0 || h[i - 1] == ' ' || h[i - 1] == ';') && !strncasecmp(h + i, param, plen) &&
            h[i + plen] == '=' && h[i + plen + 1] == '"') {
            const char *start = h + i + plen + 2,
                       *end = memchr(start, '"', hlen - (size_t)(start - h));

            if (!end)
                return -1;
            *v = start;
            *vlen = (size_t)(end - start);
            return 0;
        }
    }
    return -1;
}

int pq_form_parse(const char *body, size_t len, const char *boundary, pq_form_t *f, char *errstr,
                  size_t errsize)
{
    char delim[128];
    size_t dlen;
    const char *p, *end = body + len;

    memset(f, 0, sizeof(*f));
    dlen = (size_t)snprintf(delim, sizeof(delim), "--%s", boundary);
    if (dlen >= sizeof(delim)) {
        snprintf(errstr, errsize, "multipart boundary too long");
        return -1;
    }
    p = memmem(body, len, delim, dlen);
    if (!p) {
        snprintf(errstr, errsize, "multipart body without its boundary");
        return -1;
    }
    for (;;) {
        const char *hdr, *hend, *content, *next, *name;
        size_t namelen;

        p += dlen;
        if (end - p >= 2 && p[0] == '-' && p[1] == '-')
            return 0; /* closing delimiter */
        if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
            break;
        hdr = p + 2;
        hend = memmem(hdr, (size_t)(end - hdr), "\r\n\r\n", 4);
        if (!hend)
            break;
        content = hend + 4;
        next = memmem(content, (size_t)(end - content), delim, dlen);
        if (!next || next - content < 2 || next[-2] != '\r' || next[-1] != '\n')
            break;
        if (header_param(hdr, (size_t)(hend - hdr), "name", &name, &namelen) == 0) {
            size_t clen = (size_t)(next - 2 - content);

            if (namelen == 7 && !memcmp(name, "purpose", 7)) {
                f->purpose = content;
                f->purpose_len = clen;
            } else if (namelen == 4 && !memcmp(name, "file", 4)) {
                f->file = content;
                f->file_len = clen;
                f->have_file = 1;
                if (header_param(hdr, (size_t)(hend - hdr), "filename", &f->filename,
                                 &f->filename_len))
                    f->filename = NULL;
            }
        }
        p = next;
    }
    snprintf(errstr, errsize, "malformed multipart body");
    return -1;
}

int pq_form_boundary(const char *ctype, char *out, size_t size)
{
    const char *b;
    size_t n = 0;

    if (!ctype || strncasecmp(ctype, "multipart/form-data", 19) != 0)
        return -1;
    b = strstr(ctype, "boundary=");
    if (!b)
        return -1;
    b += 9;
    if (*b == '"') {
        b++;
        while (b[n] && b[n] != '"')
            n++;
    } else {
        while (b[n] && b[n] != ';' && b[n] != ' ')
            n++;
    }
    if (n == 0 || n >= size)
        return -1;
    memcpy(out, b, n);
    out[n] = '\0';
    return 0;
}
