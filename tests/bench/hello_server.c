/* pq-bench-hello: the peer of tests/bench/broker_peers.py's intake benchmark, a trivial evhttp
 * server built like promptq-broker's HTTP side (libevent 2.1 evhttp, one event loop per thread,
 * SO_REUSEPORT listeners on 127.0.0.1) that answers every request at once with the body of a
 * POST /v1/jobs answer: 202 {"id":"job_0","status":"queued","durability":"kafka"}. What the
 * broker does beyond this (validation, Kafka, Redis, the spool) is what the benchmark measures.
 *
 *   pq-bench-hello PORT [THREADS]   (THREADS: default 2, as broker.threads) */
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/listener.h>

#define BODY "{\"id\":\"job_0\",\"status\":\"queued\",\"durability\":\"kafka\"}"

static void on_request(struct evhttp_request *req, void *arg)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(req);

    (void)arg;
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
    evbuffer_add(out, BODY, sizeof(BODY) - 1);
    evhttp_send_reply(req, 202, "Accepted", NULL);
}

static int listen_on(int port)
{
    struct sockaddr_in sa;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;

    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 4096) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void *loop(void *arg)
{
    int port = *(int *)arg, fd = listen_on(port);
    struct event_base *base = event_base_new();
    struct evhttp *http = base ? evhttp_new(base) : NULL;

    if (fd < 0 || !http || !evhttp_accept_socket_with_handle(http, fd)) {
        fprintf(stderr, "pq-bench-hello: cannot listen on 127.0.0.1:%d\n", port);
        exit(1);
    }
    evhttp_set_gencb(http, on_request, NULL);
    event_base_dispatch(base);
    return NULL;
}

int main(int argc, char **argv)
{
    int port = argc > 1 ? atoi(argv[1]) : 0, threads = argc > 2 ? atoi(argv[2]) : 2;
    pthread_t t;

    if (port <= 0 || threads < 1 || threads > 64) {
        fprintf(stderr, "usage: pq-bench-hello PORT [THREADS]\n");
        return 2;
    }
    for (int i = 1; i < threads; i++)
        pthread_create(&t, NULL, loop, &port);
    printf("listening=127.0.0.1:%d threads=%d\n", port, threads);
    fflush(stdout);
    loop(&port);
    return 0;
}
