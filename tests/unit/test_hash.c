/* SHA-256, HMAC-SHA256, the canonical request hash and derived Kafka job ids. Expected values
 * were computed independently (sha256sum, openssl dgst, Python's json + hashlib). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "promptq/envelope.h"
#include "promptq/hash.h"

static void test_sha256_vectors(void **state)
{
    char out[PQ_SHA256_HEX_LEN + 1];

    pq_sha256_hex("abc", 3, out);
    assert_string_equal(out, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    pq_sha256_hex("", 0, out);
    assert_string_equal(out, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    /* FIPS 180-2 two-block message */
    pq_sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", 56, out);
    assert_string_equal(out, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

static void test_hmac_rfc4231(void **state)
{
    char out[PQ_SHA256_HEX_LEN + 1];
    unsigned char key1[20];
    const char *msg = "what do ya want for nothing?";

    /* RFC 4231 test case 2 */
    pq_hmac_sha256_hex("Jefe", 4, msg, strlen(msg), out);
    assert_string_equal(out, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    /* RFC 4231 test case 1 */
    memset(key1, 0x0b, sizeof(key1));
    pq_hmac_sha256_hex(key1, sizeof(key1), "Hi There", 8, out);
    assert_string_equal(out, "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
    /* an empty key is still a valid HMAC key */
    pq_hmac_sha256_hex(NULL, 0, "", 0, out);
    assert_string_equal(out, "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad");
}

static json_t *load(const char *s)
{
    json_error_t err;
    json_t *j = json_loads(s, 0, &err);
    assert_non_null(j);
    return j;
}

static void test_request_hash(void **state)
{
    char h1[PQ_SHA256_HEX_LEN + 1], h2[PQ_SHA256_HEX_LEN + 1], h3[PQ_SHA256_HEX_LEN + 1];
    json_t *a = load("{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
                     "\"temperature\":0}");
    json_t *b = load("{ \"temperature\" : 0,\n \"messages\": [ {\"content\": \"hi\",\n"
                     "   \"role\": \"user\"} ],  \"model\":\"m\" }");
    json_t *c = load("{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hI\"}],"
                     "\"temperature\":0}");

    assert_int_equal(pq_request_hash(a, h1), 0);
    assert_int_equal(pq_request_hash(b, h2), 0);
    assert_int_equal(pq_request_hash(c, h3), 0);
    /* sha256 of {"messages":[{"content":"hi","role":"user"}],"model":"m","temperature":0} */
    assert_string_equal(h1, "58d05abd45d38510e9776daf5b6f499657eac7ced020e225a8f5bf6017212c9d");
    assert_string_equal(h1, h2); /* key order (also nested) and whitespace do not matter */
    assert_string_not_equal(h1, h3);
    assert_int_equal(pq_request_hash(NULL, h3), -1);
    json_decref(a);
    json_decref(b);
    json_decref(c);
}

static void test_request_cache_hash(void **state)
{
    char plain[PQ_SHA256_HEX_LEN + 1], ph[PQ_SHA256_HEX_LEN + 1], sh[PQ_SHA256_HEX_LEN + 1],
        oh[PQ_SHA256_HEX_LEN + 1], out[PQ_SHA256_HEX_LEN + 1];
    json_t *p = load("{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}");
    json_t *s =
        load("{\"stream\":true,\"model\":\"m\",\"stream_options\":"
             "{\"include_usage\":true},\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}");
    json_t *o = load("{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
                     "\"temperature\":0.5,\"stream\":true}");

    assert_int_equal(pq_request_hash(p, plain), 0);
    assert_int_equal(pq_request_hash(s, sh), 0);
    assert_int_equal(pq_request_hash(o, oh), 0);
    assert_string_not_equal(plain, sh); /* the request hash (ids, idempotency) tells them apart */
    /* a request without the members: its own hash, as given */
    assert_int_equal(pq_request_cache_hash(p, plain, ph), 0);
    assert_string_equal(ph, plain);
    /* streamed: the plain call's cache hash; the request itself is untouched */
    assert_int_equal(pq_request_cache_hash(s, sh, out), 0);
    assert_string_equal(out, plain);
    assert_non_null(json_object_get(s, "stream_options"));
    /* any other difference still counts */
    assert_int_equal(pq_request_cache_hash(o, oh, out), 0);
    assert_string_not_equal(out, plain);
    json_decref(p);
    json_decref(s);
    json_decref(o);
}

static void test_kafka_id(void **state)
{
    char out[PQ_KAFKA_ID_LEN + 1];

    /* printf 'c/t/1/2/3' | sha256sum -> 948eca1f7a49687eb60b41ce6400af66ba59... */
    pq_id_derive_kafka("c", "t", 1, 2, 3, out);
    assert_string_equal(out, "kafka-948eca1f7a49687eb60b41ce");
    assert_int_equal(strlen(out), PQ_KAFKA_ID_LEN);
    assert_true(pq_id_valid(out));
    pq_id_derive_kafka("mkafka-cluster", "promptq.requests", 3, 12345, 1700000000000LL, out);
    assert_string_equal(out, "kafka-4a600ef783212c7cd7a774e8");
    pq_id_derive_kafka("mkafka-cluster", "promptq.requests", 3, 12346, 1700000000000LL, out);
    assert_string_not_equal(out, "kafka-4a600ef783212c7cd7a774e8");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha256_vectors), cmocka_unit_test(test_hmac_rfc4231),
        cmocka_unit_test(test_request_hash),   cmocka_unit_test(test_request_cache_hash),
        cmocka_unit_test(test_kafka_id),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
