// Process control for the supervisor. See include/CSystemSpawn.h.
#define _GNU_SOURCE
#include "CSystemSpawn.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <unistd.h>

int sealpost_spawn(pid_t *pid, const char *path, char *const argv[],
                   char *const envp[], int stdin_fd, int output_fd,
                   int new_process_group) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    sigset_t empty, all;
    int error;

    if ((error = posix_spawn_file_actions_init(&actions)) != 0)
        return error;
    if ((error = posix_spawnattr_init(&attributes)) != 0) {
        posix_spawn_file_actions_destroy(&actions);
        return error;
    }
    sigemptyset(&empty);
    sigfillset(&all);
    short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
    if (new_process_group)
        flags |= POSIX_SPAWN_SETPGROUP;
    // dup2 clears close-on-exec on the copies; the originals (opened with
    // O_CLOEXEC by the caller) vanish with closefrom below anyway.
    if ((error = posix_spawn_file_actions_adddup2(&actions, stdin_fd, 0)) != 0
        || (error = posix_spawn_file_actions_adddup2(&actions, output_fd, 1)) != 0
        || (error = posix_spawn_file_actions_adddup2(&actions, output_fd, 2)) != 0
        || (error = posix_spawn_file_actions_addclosefrom_np(&actions, 3)) != 0
        || (error = posix_spawnattr_setflags(&attributes, flags)) != 0
        || (error = posix_spawnattr_setsigmask(&attributes, &empty)) != 0
        || (error = posix_spawnattr_setsigdefault(&attributes, &all)) != 0
        || (error = posix_spawnattr_setpgroup(&attributes, 0)) != 0)
        goto out;
    error = posix_spawn(pid, path, &actions, &attributes, argv, envp);
out:
    posix_spawnattr_destroy(&attributes);
    posix_spawn_file_actions_destroy(&actions);
    return error;
}

/* Closes every descriptor in [from, to]; close_range(2) where the kernel
 * has it, a loop otherwise. Async-signal-safe. */
static void close_between(int from, unsigned int to) {
    if (from < 0 || (unsigned int)from > to)
        return;
    if (syscall(SYS_close_range, (unsigned int)from, to, 0) == 0)
        return;
    for (unsigned int fd = (unsigned int)from; fd <= to && fd < 65536; fd++)
        close((int)fd);
}

/* The child's side of sealpost_spawn_passing; never returns. Only
 * async-signal-safe calls: the parent may have other threads. */
static void spawn_child(const char *path, char *const argv[], char *const envp[],
                        int stdin_fd, int output_fd, int new_process_group,
                        const int *passed, int passed_count, char *pid_digits,
                        size_t pid_digits_size, int report_fd) {
    int floor = 3 + passed_count;
    int moved[64 + 2];
    struct sigaction default_action;
    sigset_t empty;
    int error;

    if (new_process_group && setpgid(0, 0) != 0)
        goto fail;
    /* Default dispositions first, then an empty mask: no handler of the
     * parent can run in the child. (SIGKILL, SIGSTOP and the two signals
     * glibc reserves refuse; that is fine.) */
    memset(&default_action, 0, sizeof default_action);
    default_action.sa_handler = SIG_DFL;
    sigemptyset(&default_action.sa_mask);
    for (int signal = 1; signal < NSIG; signal++)
        sigaction(signal, &default_action, NULL);
    sigemptyset(&empty);
    if (sigprocmask(SIG_SETMASK, &empty, NULL) != 0)
        goto fail;

    if (pid_digits != NULL) {
        /* Decimal digits of getpid(), written backwards then turned. */
        char digits[24];
        int count = 0;
        unsigned long value = (unsigned long)getpid();
        do {
            digits[count++] = (char)('0' + value % 10);
            value /= 10;
        } while (value != 0);
        if ((size_t)count + 1 > pid_digits_size) {
            errno = ENAMETOOLONG;
            goto fail;
        }
        for (int i = 0; i < count; i++)
            pid_digits[i] = digits[count - 1 - i];
        pid_digits[count] = '\0';
    }

    /* Every source first to a copy above the targets (close-on-exec), so
     * that placing one never overwrites another still to be placed (a
     * listening socket may well be descriptor 4 in the parent). */
    if (report_fd < floor) {
        int copy = fcntl(report_fd, F_DUPFD_CLOEXEC, floor);
        if (copy < 0)
            goto fail;
        report_fd = copy;
    }
    if ((moved[0] = fcntl(stdin_fd, F_DUPFD_CLOEXEC, floor)) < 0
        || (moved[1] = fcntl(output_fd, F_DUPFD_CLOEXEC, floor)) < 0)
        goto fail;
    for (int i = 0; i < passed_count; i++)
        if ((moved[2 + i] = fcntl(passed[i], F_DUPFD_CLOEXEC, floor)) < 0)
            goto fail;
    /* dup2 clears close-on-exec on the new descriptor. */
    if (dup2(moved[0], 0) < 0 || dup2(moved[1], 1) < 0 || dup2(moved[1], 2) < 0)
        goto fail;
    for (int i = 0; i < passed_count; i++)
        if (dup2(moved[2 + i], 3 + i) < 0)
            goto fail;
    /* Everything else goes, but the report pipe (close-on-exec: it closes
     * itself at the exec, which tells the parent the exec succeeded). */
    close_between(floor, (unsigned int)report_fd - 1);
    close_between(report_fd + 1, ~0U);

    execve(path, argv, envp);
fail:
    error = errno;
    (void)!write(report_fd, &error, sizeof error);
    _exit(127);
}

int sealpost_spawn_passing(pid_t *pid, const char *path, char *const argv[],
                           char *const envp[], int stdin_fd, int output_fd,
                           int new_process_group, const int *passed,
                           int passed_count, char *pid_digits,
                           size_t pid_digits_size) {
    int report[2];
    pid_t child;
    int error = 0;
    ssize_t n;

    if (passed_count < 0 || passed_count > 64)
        return EINVAL;
    if (pipe2(report, O_CLOEXEC) != 0)
        return errno;
    child = fork();
    if (child < 0) {
        error = errno;
        close(report[0]);
        close(report[1]);
        return error;
    }
    if (child == 0) {
        close(report[0]);
        spawn_child(path, argv, envp, stdin_fd, output_fd, new_process_group,
                    passed, passed_count, pid_digits, pid_digits_size, report[1]);
    }
    close(report[1]);
    do {
        n = read(report[0], &error, sizeof error);
    } while (n < 0 && errno == EINTR);
    close(report[0]);
    if (n == (ssize_t)sizeof error) {
        /* The exec failed: collect the child, which exited 127. */
        int status;
        while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
        }
        return error != 0 ? error : EIO;
    }
    *pid = child;
    return 0;
}

int sealpost_spawn_pipe(int fds[2], int nonblocking_read) {
    if (pipe2(fds, O_CLOEXEC) != 0)
        return -1;
    if (nonblocking_read) {
        int flags = fcntl(fds[0], F_GETFL);
        if (flags < 0 || fcntl(fds[0], F_SETFL, flags | O_NONBLOCK) != 0) {
            int saved = errno;
            close(fds[0]);
            close(fds[1]);
            errno = saved;
            return -1;
        }
    }
    return 0;
}

int sealpost_spawn_signalfd(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0)
        return -1;
    return signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
}

int sealpost_spawn_read_signal(int fd) {
    struct signalfd_siginfo info;
    ssize_t n;
    do {
        n = read(fd, &info, sizeof info);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN ? 0 : -1;
    if (n != (ssize_t)sizeof info)
        return -1;
    return (int)info.ssi_signo;
}

char *const *sealpost_spawn_environ(void) { return environ; }
