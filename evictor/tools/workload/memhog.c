/*
 * memhog: the test and demo workload evictor checkpoints.
 *
 * Started by a container's own init, it holds MIB mebibytes of anonymous
 * memory filled with a pattern derived from SEED, and once a second:
 *   - increments a counter,
 *   - verifies the next 256 MiB of the pattern (a rolling pass, so a large
 *     workload costs a bounded amount of CPU),
 *   - atomically rewrites STATUS_FILE with one line of key=value pairs:
 *       incarnation=<random id drawn at start> pid=<pid> counter=<n>
 *       passes=<complete verification passes> errors=<words that differed>
 *       mib=<MIB>
 * A process that was checkpointed and restored keeps its incarnation and its
 * counter goes on; one that was restarted draws a new incarnation and counts
 * from zero.  Linked statically so that it runs in a bare busybox rootfs.
 *
 * Options after STATUS_FILE, in any order:
 *   compressible   each word keeps 16 bits of the pattern (a nibble in each of
 *                  its low four bytes): memory that zstd shrinks about 3x, for
 *                  the compression benchmark; the default is incompressible;
 *   rate=MIB       fill the memory at MIB mebibytes a second (a spike of a given
 *                  speed, for the pressure tests); the default is at once.
 * The status file is first written once the memory is filled.
 *
 * usage: memhog MIB SEED STATUS_FILE [compressible] [rate=MIB]
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t pattern_mask = ~0ULL;

static uint64_t pattern_word(uint64_t seed, uint64_t index)
{
    /* splitmix64: words differ, so a lost or shifted page is caught. */
    uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return (z ^ (z >> 31)) & pattern_mask;
}

static uint64_t random_incarnation(void)
{
    uint64_t value = 0;
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd >= 0) {
        if (read(fd, &value, sizeof value) != (ssize_t)sizeof value)
            value = 0;
        close(fd);
    }
    if (value == 0) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        value = ((uint64_t)now.tv_sec << 32) ^ (uint64_t)now.tv_nsec ^ (uint64_t)getpid();
    }
    return value;
}

static void write_status(const char *path, const char *line)
{
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    /* Opened and closed every time: no descriptor stays open across a dump. */
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return;
    ssize_t len = (ssize_t)strlen(line);
    ssize_t written = write(fd, line, (size_t)len);
    close(fd);
    if (written == len)
        rename(tmp, path);
}

static double seconds_now(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    uint64_t rate_mib = 0;
    for (int i = 4; i < argc; i++) {
        if (strcmp(argv[i], "compressible") == 0)
            pattern_mask = 0x000000000F0F0F0FULL;
        else if (strncmp(argv[i], "rate=", 5) == 0 && strtoull(argv[i] + 5, NULL, 10) > 0)
            rate_mib = strtoull(argv[i] + 5, NULL, 10);
        else
            argc = 0;
    }
    if (argc < 4) {
        fprintf(stderr, "usage: memhog MIB SEED STATUS_FILE [compressible] [rate=MIB]\n");
        return 2;
    }
    uint64_t mib = strtoull(argv[1], NULL, 10);
    uint64_t seed = strtoull(argv[2], NULL, 10);
    const char *status_path = argv[3];
    size_t bytes = (size_t)(mib << 20);
    size_t words = bytes / sizeof(uint64_t);

    uint64_t *memory = NULL;
    if (bytes > 0) {
        memory = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (memory == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        /* With a rate, a mebibyte at a time, each when its time has come. */
        const size_t words_per_mib = (1u << 20) / sizeof(uint64_t);
        double started = seconds_now();
        for (size_t i = 0; i < words; i++) {
            if (rate_mib > 0 && i % words_per_mib == 0) {
                double due = started + (double)(i / words_per_mib) / (double)rate_mib;
                double wait = due - seconds_now();
                if (wait > 0)
                    usleep((useconds_t)(wait * 1e6));
            }
            memory[i] = pattern_word(seed, i);
        }
    }

    const size_t words_per_tick = (256u << 20) / sizeof(uint64_t);
    uint64_t incarnation = random_incarnation();
    uint64_t errors = 0, passes = 0;
    size_t cursor = 0;
    for (uint64_t counter = 1;; counter++) {
        for (size_t n = 0; n < words_per_tick && words > 0; n++) {
            if (memory[cursor] != pattern_word(seed, cursor))
                errors++;
            if (++cursor == words) {
                cursor = 0;
                passes++;
                break;
            }
        }
        if (words == 0)
            passes++;
        char line[512];
        snprintf(line, sizeof line,
                 "incarnation=%016llx pid=%d counter=%llu passes=%llu errors=%llu mib=%llu\n",
                 (unsigned long long)incarnation, (int)getpid(), (unsigned long long)counter,
                 (unsigned long long)passes, (unsigned long long)errors,
                 (unsigned long long)mib);
        write_status(status_path, line);
        sleep(1);
    }
}
