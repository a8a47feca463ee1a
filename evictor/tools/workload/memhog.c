/*
 * memhog: the test and demo workload evictor checkpoints.
 *
 * Started by a container's own init, it holds MIB mebibytes of anonymous
 * memory in 4 KiB blocks, each filled with a pattern derived from SEED, the
 * block's number and the block's version (a ledger, in its own memory, holds
 * each block's version), and once a second:
 *   - increments a counter,
 *   - verifies the next 256 MiB of blocks against the ledger (a rolling pass,
 *     so a large workload costs a bounded amount of CPU),
 *   - atomically rewrites STATUS_FILE with one line of key=value pairs:
 *       incarnation=<random id drawn at start> pid=<pid> child=<child pid or 0>
 *       counter=<n> passes=<complete verification passes> writes=<block
 *       rewrites> messages=<pipe messages> errors=<every error found> mib=<MIB>
 * A process that was checkpointed and restored keeps its incarnation and its
 * counter goes on; one that was restarted draws a new incarnation and counts
 * from zero.  Linked statically so that it runs in a bare busybox rootfs.
 *
 * Options after STATUS_FILE, in any order:
 *   scribe         never stop writing, so that a checkpoint catches it mid-write
 *                  and a restore must bring back every part of it at one
 *                  instant: some 80 times a second a random block is
 *                  rewritten with its next version and entered in the ledger
 *                  (a restore that mixed a page of one moment with a ledger of
 *                  another is an error); and a child process shares a page
 *                  with it (MAP_SHARED), increments a counter there and writes
 *                  each value to a pipe, which the parent reads and checks: one
 *                  by one, in order, never ahead of the shared counter (a lost
 *                  or repeated message, a lost child or an unshared page is an
 *                  error);
 *   compressible   each word keeps 16 bits of the pattern (a nibble in each of
 *                  its low four bytes): memory that zstd shrinks about 3x, for
 *                  the compression benchmark; the default is incompressible;
 *   rate=MIB       fill the memory at MIB mebibytes a second (a spike of a given
 *                  speed, for the pressure tests); the default is at once.
 * The status file is first written once the memory is filled.
 *
 * usage: memhog MIB SEED STATUS_FILE [scribe] [compressible] [rate=MIB]
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BLOCK_BYTES 4096u
#define BLOCK_WORDS (BLOCK_BYTES / sizeof(uint64_t))

static uint64_t pattern_mask = ~0ULL;

static uint64_t mix(uint64_t z)
{
    /* splitmix64's finaliser: words differ, so a lost or shifted page is caught. */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static uint64_t pattern_word(uint64_t seed, uint64_t block, uint32_t version, uint64_t word)
{
    uint64_t index = block * BLOCK_WORDS + word;
    return mix(seed + (index + 1) * 0x9E3779B97F4A7C15ULL + ((uint64_t)version << 44)) &
           pattern_mask;
}

static void write_block(uint64_t *memory, uint64_t seed, uint64_t block, uint32_t version)
{
    uint64_t *words = memory + block * BLOCK_WORDS;
    for (uint64_t w = 0; w < BLOCK_WORDS; w++)
        words[w] = pattern_word(seed, block, version, w);
}

static int block_matches(const uint64_t *memory, uint64_t seed, uint64_t block, uint32_t version)
{
    const uint64_t *words = memory + block * BLOCK_WORDS;
    for (uint64_t w = 0; w < BLOCK_WORDS; w++)
        if (words[w] != pattern_word(seed, block, version, w))
            return 0;
    return 1;
}

static uint64_t random_u64(void)
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

static void *map(size_t bytes, int shared)
{
    void *memory = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                        (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return memory;
}

/* The scribe's child: count in the shared page, and tell the parent each value. */
static void child_loop(volatile uint64_t *shared, int pipe_out)
{
    for (;;) {
        uint64_t next = *shared + 1;
        *shared = next;
        if (write(pipe_out, &next, sizeof next) != (ssize_t)sizeof next)
            _exit(1);
        usleep(20000);
    }
}

int main(int argc, char **argv)
{
    uint64_t rate_mib = 0;
    int scribe = 0;
    for (int i = 4; i < argc; i++) {
        if (strcmp(argv[i], "compressible") == 0)
            pattern_mask = 0x000000000F0F0F0FULL;
        else if (strcmp(argv[i], "scribe") == 0)
            scribe = 1;
        else if (strncmp(argv[i], "rate=", 5) == 0 && strtoull(argv[i] + 5, NULL, 10) > 0)
            rate_mib = strtoull(argv[i] + 5, NULL, 10);
        else
            argc = 0;
    }
    if (argc < 4) {
        fprintf(stderr, "usage: memhog MIB SEED STATUS_FILE [scribe] [compressible] [rate=MIB]\n");
        return 2;
    }
    uint64_t mib = strtoull(argv[1], NULL, 10);
    uint64_t seed = strtoull(argv[2], NULL, 10);
    const char *status_path = argv[3];
    uint64_t blocks = (mib << 20) / BLOCK_BYTES;

    /* The child first: forked later, it would share the memory copy-on-write, and
     * each rewrite would copy a page. */
    int pipe_in = -1;
    pid_t child = 0;
    volatile uint64_t *shared = NULL;
    if (scribe) {
        int pipe_fds[2];
        shared = map(BLOCK_BYTES, 1);
        if (pipe(pipe_fds) != 0) {
            perror("pipe");
            return 1;
        }
        child = fork();
        if (child < 0) {
            perror("fork");
            return 1;
        }
        if (child == 0) {
            close(pipe_fds[0]);
            child_loop(shared, pipe_fds[1]);
        }
        close(pipe_fds[1]);
        pipe_in = pipe_fds[0];
        fcntl(pipe_in, F_SETFL, O_NONBLOCK);
    }

    uint64_t *memory = NULL;
    uint32_t *ledger = NULL;
    if (blocks > 0) {
        memory = map(blocks * BLOCK_BYTES, 0);
        ledger = map(blocks * sizeof(uint32_t), 0); /* versions start at 0 */
        /* With a rate, a mebibyte at a time, each when its time has come. */
        const uint64_t blocks_per_mib = (1u << 20) / BLOCK_BYTES;
        double started = seconds_now();
        for (uint64_t b = 0; b < blocks; b++) {
            if (rate_mib > 0 && b % blocks_per_mib == 0) {
                double due = started + (double)(b / blocks_per_mib) / (double)rate_mib;
                double wait = due - seconds_now();
                if (wait > 0)
                    usleep((useconds_t)(wait * 1e6));
            }
            write_block(memory, seed, b, 0);
        }
    }

    const uint64_t blocks_per_tick = (256u << 20) / BLOCK_BYTES;
    uint64_t incarnation = random_u64(), random_state = random_u64() | 1;
    uint64_t errors = 0, passes = 0, writes = 0, messages = 0, last_message = 0;
    uint64_t cursor = 0;
    double next_second = seconds_now();
    for (uint64_t counter = 1;;) {
        if (scribe) {
            /* Rewrite a random block with its next version, then enter it. */
            if (blocks > 0) {
                random_state = mix(random_state + 0x9E3779B97F4A7C15ULL);
                uint64_t block = random_state % blocks;
                write_block(memory, seed, block, ledger[block] + 1);
                ledger[block]++;
                writes++;
            }
            uint64_t message;
            while (read(pipe_in, &message, sizeof message) == (ssize_t)sizeof message) {
                if (message != last_message + 1 || message > *shared)
                    errors++;
                last_message = message;
                messages++;
            }
            if (waitpid(child, NULL, WNOHANG) != 0)
                errors++; /* the child is gone */
        }
        double now = seconds_now();
        if (now < next_second) {
            /* A scribe writes some 80 times a second; the rest sleep till the tick. */
            usleep(scribe ? 10000 : (useconds_t)((next_second - now) * 1e6));
            continue;
        }
        /* A tick a second; after a stop (a checkpoint), one tick, not a burst. */
        next_second = now - next_second > 1.0 ? now + 1.0 : next_second + 1.0;
        for (uint64_t n = 0; n < blocks_per_tick && blocks > 0; n++) {
            if (!block_matches(memory, seed, cursor, ledger[cursor]))
                errors++;
            if (++cursor == blocks) {
                cursor = 0;
                passes++;
                break;
            }
        }
        if (blocks == 0)
            passes++;
        char line[512];
        snprintf(line, sizeof line,
                 "incarnation=%016llx pid=%d child=%d counter=%llu passes=%llu writes=%llu"
                 " messages=%llu errors=%llu mib=%llu\n",
                 (unsigned long long)incarnation, (int)getpid(), (int)child,
                 (unsigned long long)counter, (unsigned long long)passes,
                 (unsigned long long)writes, (unsigned long long)messages,
                 (unsigned long long)errors, (unsigned long long)mib);
        write_status(status_path, line);
        counter++;
    }
}
