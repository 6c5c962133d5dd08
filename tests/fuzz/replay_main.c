/* Corpus replay for libFuzzer targets built without -fsanitize=fuzzer (any compiler): feeds
 * every file of the given directories (or the files themselves) to LLVMFuzzerTestOneInput, then
 * a fixed, seeded set of variants of each (every truncation point for small inputs, byte flips,
 * inserted and deleted bytes) so ctest exercises more than the seeds. Exit status 0 means no
 * input crashed (a crash or abort() fails the test). */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define REPLAY_MAX_FILE  (1024 * 1024)
#define REPLAY_MUTATIONS 200

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rng(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

/* Runs one input from a heap copy of exactly its size, so ASan sees reads past the end. */
static void run(const uint8_t *data, size_t size)
{
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) {
        perror("malloc");
        exit(2);
    }
    memcpy(copy, data, size);
    LLVMFuzzerTestOneInput(copy, size);
    free(copy);
}

static size_t replay_file(const char *path)
{
    static const char interesting[] = "{}[]\":,\\0-1.eE\x00\xff\n tfn";
    FILE *f = fopen(path, "rb");
    uint8_t *buf, *mut;
    size_t size, runs = 0;
    struct stat st;

    if (!f || fstat(fileno(f), &st) != 0 || st.st_size > REPLAY_MAX_FILE) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(2);
    }
    size = (size_t)st.st_size;
    buf = malloc(size + 1);
    mut = malloc(size + 2);
    if (!buf || !mut || fread(buf, 1, size, f) != size) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(2);
    }
    fclose(f);

    run(buf, size);
    runs++;
    if (size <= 4096) {
        for (size_t cut = 0; cut < size; cut++, runs++)
            run(buf, cut);
    }
    for (int i = 0; i < REPLAY_MUTATIONS && size > 0; i++, runs++) {
        size_t pos = (size_t)(rng() % size), n = size;
        memcpy(mut, buf, size);
        switch (rng() % 4) {
        case 0: /* flip a bit */
            mut[pos] ^= (uint8_t)(1u << (rng() % 8));
            break;
        case 1: /* replace with a structural byte */
            mut[pos] = (uint8_t)interesting[rng() % (sizeof(interesting) - 1)];
            break;
        case 2: /* insert a byte */
            memmove(mut + pos + 1, mut + pos, size - pos);
            mut[pos] = (uint8_t)interesting[rng() % (sizeof(interesting) - 1)];
            n = size + 1;
            break;
        default: /* delete a byte */
            memmove(mut + pos, mut + pos + 1, size - pos - 1);
            n = size - 1;
            break;
        }
        run(mut, n);
    }
    free(mut);
    free(buf);
    return runs;
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv)
{
    size_t files = 0, runs = 0;

    if (argc < 2) {
        fprintf(stderr, "usage: %s DIR|FILE...\n", argv[0]);
        return 2;
    }
    for (int a = 1; a < argc; a++) {
        struct stat st;
        if (stat(argv[a], &st) != 0) {
            fprintf(stderr, "cannot stat %s\n", argv[a]);
            return 2;
        }
        if (!S_ISDIR(st.st_mode)) {
            runs += replay_file(argv[a]);
            files++;
            continue;
        }
        DIR *dir = opendir(argv[a]);
        struct dirent *de;
        char **names = NULL;
        size_t n = 0, cap = 0;
        if (!dir) {
            fprintf(stderr, "cannot open %s\n", argv[a]);
            return 2;
        }
        while ((de = readdir(dir))) {
            if (de->d_name[0] == '.')
                continue;
            if (n == cap) {
                cap = cap ? cap * 2 : 32;
                names = realloc(names, cap * sizeof(*names));
                if (!names)
                    return 2;
            }
            names[n++] = strdup(de->d_name);
        }
        closedir(dir);
        qsort(names, n, sizeof(*names), name_cmp);
        for (size_t i = 0; i < n; i++) {
            char path[4096];
            snprintf(path, sizeof(path), "%s/%s", argv[a], names[i]);
            runs += replay_file(path);
            files++;
            free(names[i]);
        }
        free(names);
    }
    if (files == 0) {
        fprintf(stderr, "no corpus files\n");
        return 1;
    }
    printf("replayed %zu files, %zu inputs: ok\n", files, runs);
    return 0;
}
