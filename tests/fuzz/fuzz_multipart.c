/* libFuzzer target for the multipart/form-data parser of POST /v1/files (broker/src/multipart.c).
 * Input: a Content-Type header value, a newline, then the body. Whatever the bytes: the boundary
 * comes out NUL-terminated and within its buffer, or not at all; a parsed form's fields point
 * into the body, within it, and the error text never quotes it. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "multipart.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void inside(const char *body, size_t len, const char *p, size_t n)
{
    if (!p)
        return;
    if (p < body || p > body + len || n > (size_t)(body + len - p))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *nl = memchr(data, '\n', size);
    char ctype[512], boundary[128], errstr[256];
    size_t clen = nl ? (size_t)(nl - (const char *)data) : size;
    const char *body;
    size_t len;
    pq_form_t f;
    char *copy;

    if (clen >= sizeof(ctype))
        return 0;
    memcpy(ctype, data, clen);
    ctype[clen] = '\0';
    if (pq_form_boundary(ctype, boundary, sizeof(boundary)) != 0)
        return 0;
    if (strlen(boundary) == 0 || strlen(boundary) >= sizeof(boundary))
        abort();
    /* the body on its own allocation, so reading past it is caught */
    len = nl ? size - clen - 1 : 0;
    copy = malloc(len ? len : 1);
    if (!copy)
        return 0;
    if (len)
        memcpy(copy, nl + 1, len);
    body = copy;
    errstr[0] = '\0';
    if (pq_form_parse(body, len, boundary, &f, errstr, sizeof(errstr)) == 0) {
        inside(body, len, f.purpose, f.purpose_len);
        inside(body, len, f.file, f.file_len);
        inside(body, len, f.filename, f.filename_len);
        if (f.have_file != (f.file != NULL))
            abort();
    } else if (!errstr[0] || strlen(errstr) >= sizeof(errstr)) {
        abort();
    }
    free(copy);
    return 0;
}
