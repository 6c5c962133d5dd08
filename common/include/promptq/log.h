/* Levelled logging to stderr, plain text or JSON lines.
 * The macros check the level before evaluating their arguments. */
#ifndef PROMPTQ_LOG_H
#define PROMPTQ_LOG_H

typedef enum {
    PQ_LOG_DEBUG = 0,
    PQ_LOG_INFO = 1,
    PQ_LOG_WARN = 2,
    PQ_LOG_ERROR = 3,
} pq_log_level_t;

/* Current threshold; messages below it are skipped. Read without locking. */
extern volatile int pq_log_threshold;

/* Sets the program name shown in each line, the threshold and the format (json != 0: one JSON
 * object per line). Safe to call again (SIGHUP). */
void pq_log_init(const char *prog, pq_log_level_t level, int json);

/* Parses "debug", "info", "warn", "error"; returns -1 for anything else. */
int pq_log_level_parse(const char *s);

/* Backend; use the macros. Thread-safe: each line is written with one write(2). */
void pq_log_write(pq_log_level_t level, const char *func, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define PQ_LOG(lvl, ...)                                                                           \
    do {                                                                                           \
        if ((int)(lvl) >= pq_log_threshold)                                                        \
            pq_log_write((lvl), __func__, __LINE__, __VA_ARGS__);                                  \
    } while (0)
#define PQ_DBG(...)  PQ_LOG(PQ_LOG_DEBUG, __VA_ARGS__)
#define PQ_INFO(...) PQ_LOG(PQ_LOG_INFO, __VA_ARGS__)
#define PQ_WARN(...) PQ_LOG(PQ_LOG_WARN, __VA_ARGS__)
#define PQ_ERR(...)  PQ_LOG(PQ_LOG_ERROR, __VA_ARGS__)

#endif
