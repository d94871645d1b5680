// Process control for the supervisor. See include/CSystemSpawn.h.
#define _GNU_SOURCE
#include "CSystemSpawn.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/signalfd.h>
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
