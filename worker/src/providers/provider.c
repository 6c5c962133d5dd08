/* The registry of provider adapters. */
#include "provider.h"

#include <stdlib.h>
#include <string.h>

static const pq_provider_ops_t *const registry[] = {
    &pq_provider_openai, &pq_provider_azure_openai, &pq_provider_anthropic,
    &pq_provider_gemini, &pq_provider_watsonx,
};

const pq_provider_ops_t *pq_provider_find(const char *type)
{
    if (!type)
        return NULL;
    for (size_t i = 0; i < sizeof(registry) / sizeof(registry[0]); i++)
        if (strcmp(registry[i]->type, type) == 0)
            return registry[i];
    return NULL;
}

void pq_provider_req_clear(pq_provider_req_t *req)
{
    if (!req)
        return;
    free(req->url);
    curl_slist_free_all(req->headers);
    free(req->body);
    memset(req, 0, sizeof(*req));
}
