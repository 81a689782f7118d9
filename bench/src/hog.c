/* The benchmark's workload (usage: hog STATE_DIR MIB): fills MIB MiB with incompressible data, writes STATE/ready, then idles.
 * When STATE/check appears it removes it, checks every byte against the pattern and writes
 * STATE/verified ("ok" or "bad"), so a restore is measured first and its memory verified after. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t fold(const uint64_t *p, size_t words) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < words; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

static void put(const char *dir, const char *name, const char *text) {
    char tmp[4096], path[4096];
    snprintf(tmp, sizeof tmp, "%s/%s.tmp", dir, name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(tmp, "w");
    if (!f) exit(3);
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    size_t words = ((size_t)atol(argv[2]) << 20) / 8;
    uint64_t *p = malloc(words * 8), x = 88172645463325252ULL;
    if (!p) return 1;
    for (size_t i = 0; i < words; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; p[i] = x; }
    uint64_t want = fold(p, words);
    char check[4096];
    snprintf(check, sizeof check, "%s/check", argv[1]);
    put(argv[1], "ready", "ready\n");
    for (;;) {
        if (unlink(check) == 0) put(argv[1], "verified", fold(p, words) == want ? "ok\n" : "bad\n");
        usleep(5000);
    }
}
