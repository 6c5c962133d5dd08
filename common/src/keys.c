#include "promptq/keys.h"

#include <stdio.h>

static int fit(int n, size_t size)
{
    return (n < 0 || (size_t)n >= size) ? -1 : n;
}

int pq_key_job(char *buf, size_t size, const char *prefix, const char *tenant, const char *id)
{
    return fit(snprintf(buf, size, "%sjob:%s:%s", prefix, tenant, id), size);
}

int pq_key_stream(char *buf, size_t size, const char *prefix, const char *tenant, const char *id)
{
    return fit(snprintf(buf, size, "%sstream:%s:%s", prefix, tenant, id), size);
}

int pq_key_lease(char *buf, size_t size, const char *prefix, const char *tenant, const char *id)
{
    return fit(snprintf(buf, size, "%slease:%s:%s", prefix, tenant, id), size);
}

int pq_key_cache(char *buf, size_t size, const char *prefix, const char *tenant, const char *hash)
{
    return fit(snprintf(buf, size, "%scache:%s:%s", prefix, tenant, hash), size);
}

int pq_key_idem(char *buf, size_t size, const char *prefix, const char *tenant, const char *key)
{
    return fit(snprintf(buf, size, "%sidem:%s:%s", prefix, tenant, key), size);
}

int pq_key_reply(char *buf, size_t size, const char *prefix, const char *instance)
{
    return fit(snprintf(buf, size, "%sreply:%s", prefix, instance), size);
}

int pq_key_health(char *buf, size_t size, const char *prefix, const char *instance)
{
    return fit(snprintf(buf, size, "%shealth:%s", prefix, instance), size);
}

int pq_key_callbacks(char *buf, size_t size, const char *prefix)
{
    return fit(snprintf(buf, size, "%scallbacks", prefix), size);
}

int pq_key_jobs(char *buf, size_t size, const char *prefix, const char *tenant)
{
    return fit(snprintf(buf, size, "%sjobs:%s", prefix, tenant), size);
}

int pq_key_route_ops(char *buf, size_t size, const char *prefix, const char *route)
{
    return fit(snprintf(buf, size, "%sops:route:%s", prefix, route), size);
}
