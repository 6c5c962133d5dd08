/* POST /v1/chat/completions, sync waiters, GET /v1/models (chat.c). */
#ifndef PQ_BROKER_CHAT_H
#define PQ_BROKER_CHAT_H

#include "slot.h"

/* chat.c: POST /v1/chat/completions, sync waiters, GET /v1/models */
void pq_chat_post(pq_bthread_t *t, struct evhttp_request *req);
/* The chat job of s is durable (Kafka or spool): wait for its result. Also used for an
 * idempotent repeat whose job exists. */
void pq_chat_wait(pq_slot_t *s);
void pq_chat_redis_reply(pq_slot_t *s, const void *reply);
void pq_chat_timeout(pq_slot_t *s);
/* A reply-channel message "<tenant>:<id>" (from the subscriber). */
void pq_chat_notify(pq_bthread_t *t, const char *msg, size_t len);
/* The subscription is (again) confirmed: reads every waiter's record (messages may have been
 * missed while it was down). */
void pq_chat_subscribed(pq_bthread_t *t);
/* Removes a slot from the waiter table if it is in it (slot release). */
void pq_chat_unlink(pq_slot_t *s);
int pq_chat_thread_init(pq_bthread_t *t);
void pq_chat_thread_free(pq_bthread_t *t);
/* Answers every waiter 504 (stop deadline). */
void pq_chat_stop_waiters(pq_bthread_t *t);
/* GET /v1/jobs/{id}/stream: the job's live stream from its start, or after Last-Event-ID. */
void pq_chat_resume(pq_bthread_t *t, struct evhttp_request *req, const char *id);
void pq_models_get(pq_bthread_t *t, struct evhttp_request *req, const char *id);
/* OpenAI-shaped error for the chat path: {"error":{"message","type","param":null,"code"}}. */
void pq_chat_error(pq_bthread_t *t, struct evhttp_request *req, int code, const char *type,
                   const char *errcode, const char *fmt, ...) __attribute__((format(printf, 6, 7)));

#endif
