#include "common.h"

#include <stdlib.h>
#include <string.h>

int pq_provider_header_add(struct curl_slist **list, const char *name, const char *value)
{
    size_t n = strlen(name), v = strlen(value);
    char *line = malloc(n + v + 3);
    struct curl_slist *l;

    if (!line)
        return -1;
    memcpy(line, name, n);
    line[n] = ':';
    line[n + 1] = ' ';
    memcpy(line + n + 2, value, v + 1);
    l = curl_slist_append(*list, line);
    explicit_bzero(line, n + v + 2); /* may hold a key */
    free(line);
    if (!l)
        return -1;
    *list = l;
    return 0;
}

void pq_provider_safe_token(const json_t *v, char *buf, size_t size)
{
    const char *s = json_string_value(v);
    size_t n = s ? strlen(s) : 0;

    if (size == 0)
        return;
    buf[0] = '\0';
    if (n == 0 || n >= size || n > 64)
        return;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'))
            return;
    }
    memcpy(buf, s, n + 1);
}

int pq_provider_field_set(const json_t *v)
{
    if (!v || json_is_null(v) || json_is_false(v))
        return 0;
    if (json_is_number(v))
        return json_number_value(v) != 0.0;
    if (json_is_string(v))
        return json_string_length(v) > 0;
    if (json_is_array(v))
        return json_array_size(v) > 0;
    if (json_is_object(v))
        return json_object_size(v) > 0;
    return 1;
}

char *pq_provider_escape(const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = strlen(s), o = 0;
    char *out = malloc(3 * n + 1);

    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '.' || c == '_' || c == '~') {
            out[o++] = (char)c;
        } else {
            out[o++] = '%';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        }
    }
    out[o] = '\0';
    return out;
}
