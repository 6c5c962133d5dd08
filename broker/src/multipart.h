/* multipart/form-data, as POST /v1/files takes it (multipart.c): pure, bytes in, pointers into
 * them out. */
#ifndef PQ_BROKER_MULTIPART_H
#define PQ_BROKER_MULTIPART_H

#include <stddef.h>

/* The form's fields of interest; pointers into the parsed body (not NUL-terminated). */
typedef struct {
    const char *purpose;
    size_t purpose_len;
    const char *file;
    size_t file_len;
    const char *filename; /* the file part's filename="...", or NULL */
    size_t filename_len;
    int have_file;
} pq_form_t;

/* Parses body (len bytes) against boundary: the parts named "purpose" and "file". Returns 0, or
 * -1 with errstr naming what is wrong (never quoting the body). */
int pq_form_parse(const char *body, size_t len, const char *boundary, pq_form_t *f, char *errstr,
                  size_t errsize);

/* The boundary of a multipart/form-data Content-Type (quoted or not) into out. 0, or -1 when
 * ctype is not multipart/form-data, has no boundary, or it does not fit. */
int pq_form_boundary(const char *ctype, char *out, size_t size);

#endif
