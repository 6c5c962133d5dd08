/* A job's records from its state (job_int.h; the documents themselves: jobdoc.c). */
#include <stdlib.h>
#include <string.h>
#include "job_int.h"

/* The job's record inputs (jobdoc.h), borrowed from j; the time is now. */
void pq_jobrec_doc(const pq_job_t *j, pq_jobdoc_t *d)
{
    memset(d, 0, sizeof(*d));
    d->env = &j->env;
    d->status = j->status;
    d->provider = j->last_target ? j->last_target->provider : NULL;
    d->model = j->last_target ? j->last_target->model : NULL;
    d->attempts = j->attempts;
    d->alog = j->alog;
    d->slim = j->slim;
    d->cached = j->cached;
    d->response = j->response;
    d->response_text = j->response_text;
    d->response_len = j->response_len;
    d->err = j->err;
    d->errmsg = j->errmsg;
    d->http_status = j->http_status;
    d->fault_code = j->fault.code;
    d->fault_reason = j->fault.reason;
    d->created_ms = j->created_ms;
    d->now_ms = pq_now_ms();
    d->src_topic = j->src_topic;
    d->partition = j->partition;
    d->offset = j->offset;
}

void pq_jobrec_set_response(pq_job_t *j, json_t *completion, const char *raw, size_t raw_len)
{
    pq_jobrec_clear_response(j);
    j->response = completion;
    if (!raw)
        return;
    while (raw_len && strchr(" \t\r\n", raw[0]) && raw[0]) {
        raw++;
        raw_len--;
    }
    while (raw_len && strchr(" \t\r\n", raw[raw_len - 1]) && raw[raw_len - 1])
        raw_len--;
    /* out of memory: the text is made from completion when needed */
    if ((j->response_text = malloc(raw_len + 1))) {
        memcpy(j->response_text, raw, raw_len);
        j->response_text[raw_len] = '\0';
        j->response_len = raw_len;
    }
}

void pq_jobrec_clear_response(pq_job_t *j)
{
    json_decref(j->response);
    j->response = NULL;
    free(j->response_text);
    j->response_text = NULL;
    j->response_len = 0;
}

const char *pq_jobrec_response_text(pq_job_t *j, size_t *len)
{
    if (!j->response_text && j->response)
        j->response_text = pq_jobdoc_dump(j->response, &j->response_len);
    *len = j->response_len;
    return j->response_text;
}

json_t *pq_jobrec_error(const pq_job_t *j)
{
    pq_jobdoc_t d;

    pq_jobrec_doc(j, &d);
    return pq_jobdoc_error(&d);
}

char *pq_jobrec_result(pq_job_t *j, size_t *len)
{
    pq_jobdoc_t d;
    size_t n;

    pq_jobrec_response_text(j, &n);
    pq_jobrec_doc(j, &d);
    return pq_jobdoc_result(&d, len);
}

char *pq_jobrec_dlq_small(pq_job_t *j, size_t *len)
{
    pq_jobdoc_t d;

    pq_jobrec_doc(j, &d);
    j->dlq_small = 1;
    return pq_jobdoc_dlq_small(&d, len);
}

/* Envelope + "error" (taken) for promptq.dlq (the small stand-in when that is over max_msg). */
char *pq_jobrec_dlq(pq_job_t *j, json_t *error, size_t *len)
{
    pq_jobdoc_t d;

    pq_jobrec_doc(j, &d);
    return pq_jobdoc_dlq(&d, error, j->w->max_msg, &j->dlq_small, len);
}
