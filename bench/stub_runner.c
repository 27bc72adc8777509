/* The bench's stand-in for QEMU: records when it was exec'd, connects to every vhost-user socket
 * named on its command line (-chardev socket,...,path=P) as QEMU does, then either exits at once
 * or holds until SIGUSR1/SIGTERM, and records when it exits. C, so that its own start costs
 * microseconds and the figures are the launchers'.
 *
 * The preflight's queries (`-version`, `-machine help`, `-device help`, ...) are answered by the
 * real QEMU (BENCH_QEMU, default /usr/bin/qemu-system-x86_64), exec'd in place: they cost what
 * they cost a user, and they leave no marks.
 *
 * Environment: BENCH_MARKS  file the lines "pid N", "exec NS", "connected NS", "exit NS" are
 *                           appended to (NS: CLOCK_MONOTONIC, as Python's time.monotonic_ns)
 *              BENCH_HOLD   "1": wait for SIGUSR1 or SIGTERM before exiting
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void mark(const char *what, long long value) {
    const char *path = getenv("BENCH_MARKS");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    fprintf(f, "%s %lld\n", what, value);
    fclose(f);
}

int main(int argc, char **argv) {
    long long started = now_ns();
    /* A probe: `-version`, `-X help`, or the sandbox probe `-sandbox ... -device help` (checks.py). */
    if ((argc == 2 && strcmp(argv[1], "-version") == 0) || (argc >= 3 && strcmp(argv[argc - 1], "help") == 0)) {
        const char *qemu = getenv("BENCH_QEMU");
        if (!qemu || !*qemu) qemu = "/usr/bin/qemu-system-x86_64";
        argv[0] = (char *)qemu;
        execv(qemu, argv);
        perror("stub runner: exec of the real QEMU for a probe failed");
        return 127;
    }
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGTERM);
    sigprocmask(SIG_BLOCK, &set, NULL); /* taken with sigwait below, never lost */
    mark("pid", getpid());
    mark("exec", started);
    int fds[64];
    int count = 0;
    for (int i = 1; i + 1 < argc && count < 64; i++) {
        if (strcmp(argv[i], "-chardev") != 0 || strncmp(argv[i + 1], "socket,", 7) != 0) continue;
        const char *path = strstr(argv[i + 1], ",path=");
        if (!path) continue; /* fd=N chardevs (QMP) are not ours to connect */
        path += 6;
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        size_t length = strcspn(path, ",");
        if (length >= sizeof(addr.sun_path)) return 1;
        memcpy(addr.sun_path, path, length);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
            fprintf(stderr, "stub runner: Failed to connect to '%.*s'\n", (int)length, path);
            return 1;
        }
        fds[count++] = fd;
    }
    mark("connected", now_ns());
    const char *hold = getenv("BENCH_HOLD");
    if (hold && strcmp(hold, "1") == 0) {
        int signum;
        sigwait(&set, &signum);
    }
    mark("exit", now_ns());
    for (int i = 0; i < count; i++) close(fds[i]);
    return 0;
}
