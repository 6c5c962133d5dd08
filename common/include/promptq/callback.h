/* callback_url: which URLs may be called back, with which secret, and the signature header
 * (DESIGN.md §3, §5; SECURITY.md).
 *
 * A job's callback_url is chosen by whoever submits it, so it is only called when its host is on
 * callbacks.allow_hosts and the job's tenant has a signing secret. The broker checks at intake
 * (400); workers check again before queueing the POST (a job produced straight into Kafka never
 * met the broker). URLs are parsed with libcurl's URL parser, the one that later connects, so
 * the host checked is the host called. */
#ifndef PROMPTQ_CALLBACK_H
#define PROMPTQ_CALLBACK_H

#include <stddef.h>
#include <stdint.h>

#include "promptq/conf.h"

/* The longest callback_url accepted. */
#define PQ_CALLBACK_URL_MAX 2048

/* Size of a signature header value: "t=<20 digits>,v1=<64 hex>" and the NUL. */
#define PQ_CALLBACK_SIG_SIZE 96

/* Whether an allow_hosts entry is well formed: "host", "*.domain" or "[v6 address]", each
 * optionally followed by ":port". Pure. */
int pq_callback_pattern_ok(const char *pattern);

/* Whether host (as libcurl reports it: lowercase or not, IPv6 in brackets) and port match one of
 * the patterns: a host entry matches that host exactly, "*.domain" matches any name ending in
 * ".domain" (not "domain" itself); an entry with a port matches that port only. Case-insensitive.
 * Pure. */
int pq_callback_host_allowed(char *const *patterns, size_t n, const char *host, long port);

/* The tenant's signing secret (its own entry, else "*"), or NULL. Borrowed from conf. */
const char *pq_callback_secret(const pq_conf_t *conf, const char *tenant);

/* Whether url may be called back for tenant: an http(s) URL without credentials, at most
 * PQ_CALLBACK_URL_MAX bytes, whose host is allowed, and a tenant with a secret. Returns 0, or -1
 * with why set ("callback_url: ..."); why names the host, never the path or query (they may
 * carry tokens). */
int pq_callback_check(const pq_conf_t *conf, const char *tenant, const char *url, char *why,
                      size_t why_size);

/* Writes "t=<t>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed with secret>" into out
 * (PQ_CALLBACK_SIG_SIZE bytes). Returns 0, -1 when out of memory. */
int pq_callback_sign(const char *secret, int64_t t, const char *body, size_t len, char *out,
                     size_t out_size);

#endif
