/* libFuzzer target for the envelope parser. Besides "no crash, no leak", it checks that a
 * parsed envelope survives pq_envelope_dump: the dump is one line, parses again and gives the
 * same request hash and fields. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "promptq/envelope.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Small caps so the fuzzer reaches the limit paths. */
static const pq_envelope_limits_t fuzz_limits = {
    .max_bytes = 64 * 1024,
    .max_prompt_bytes = 512,
    .max_messages = 8,
};

/* The dump of a valid envelope may be longer than its input (a bare body gets wrapped, 1e2
 * becomes 100.0), so the re-parse is uncapped. */
static const pq_envelope_limits_t no_limits = {0, 0, 0, NULL};

static int same_str(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    pq_envelope_t env, again;
    char errstr[256];
    size_t len = 0;
    char *dump;

    if (pq_envelope_parse((const char *)data, size, &fuzz_limits, &env, errstr, sizeof(errstr)) !=
        PQ_OK) {
        if (env.root || errstr[0] == '\0')
            abort(); /* a failure must leave out cleared and say why */
        return 0;
    }
    dump = pq_envelope_dump(&env, &len);
    if (!dump || memchr(dump, '\n', len) || strlen(dump) != len)
        abort();
    if (pq_envelope_parse(dump, len, &no_limits, &again, errstr, sizeof(errstr)) != PQ_OK)
        abort();
    if (strcmp(env.request_hash, again.request_hash) != 0 || !same_str(env.id, again.id) ||
        !same_str(env.tenant, again.tenant) || !same_str(env.model, again.model) ||
        env.deadline_ms != again.deadline_ms || env.cache != again.cache)
        abort();
    if (pq_envelope_set_id(&again, "job_fuzz") != 0 || strcmp(again.id, "job_fuzz") != 0)
        abort();
    free(dump);
    pq_envelope_clear(&again);
    pq_envelope_clear(&env);
    return 0;
}
