#define _GNU_SOURCE
#include <sys/prctl.h>
#include "CSystemShims.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

FILE *sealpost_stderr(void) { return stderr; }

ssize_t sealpost_sendmsg_fds(int sock, const void *buf, size_t len,
                             const int *fds, size_t nfds) {
    return sealpost_sendmsg_fds_flags(sock, buf, len, fds, nfds, 0);
}

ssize_t sealpost_sendmsg_fds_flags(int sock, const void *buf, size_t len,
                                   const int *fds, size_t nfds, int flags) {
    if (nfds > SEALPOST_MAX_FDS) { errno = EINVAL; return -1; }
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    // Aligned storage for the largest control message we send.
    union {
        char buf[CMSG_SPACE(sizeof(int) * SEALPOST_MAX_FDS)];
        struct cmsghdr align;
    } control;
    if (nfds > 0) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * nfds);
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL | flags);
}

ssize_t sealpost_recvmsg_fds(int sock, void *buf, size_t len,
                             int *fds, size_t maxfds, size_t *nfds, int *truncated) {
    *nfds = 0;
    *truncated = 0;
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    union {
        char buf[CMSG_SPACE(sizeof(int) * SEALPOST_MAX_FDS)];
        struct cmsghdr align;
    } control;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) return -1;
    if (msg.msg_flags & MSG_CTRUNC) *truncated = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *data = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, data + i, sizeof fd);
            if (*nfds < maxfds) {
                fds[(*nfds)++] = fd;
            } else {
                close(fd);
                *truncated = 1;
            }
        }
    }
    return n;
}

static int fill_sockaddr(struct sockaddr_un *sun, const char *path) {
    memset(sun, 0, sizeof *sun);
    sun->sun_family = AF_UNIX;
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof sun->sun_path) { errno = ENAMETOOLONG; return -1; }
    memcpy(sun->sun_path, path, len + 1);
    return 0;
}

int sealpost_unix_connect(const char *path) {
    return sealpost_unix_connect_timeout(path, 0);
}

int sealpost_unix_connect_timeout(const char *path, int timeout_ms) {
    struct sockaddr_un sun;
    if (fill_sockaddr(&sun, path) < 0) return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (timeout_ms > 0) {
        /* connect(2) on AF_UNIX waits for room in the listener's backlog
           for as long as SO_SNDTIMEO allows, then fails with EAGAIN. */
        struct timeval tv = { timeout_ms / 1000, (timeout_ms % 1000) * 1000 };
        if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0) {
            int saved = errno;
            close(fd);
            errno = saved;
            return -1;
        }
    }
    int r;
    do {
        r = connect(fd, (struct sockaddr *)&sun, sizeof sun);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int sealpost_unix_bind(const char *path) {
    struct sockaddr_un sun;
    if (fill_sockaddr(&sun, path) < 0) return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&sun, sizeof sun) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int sealpost_unix_listen(const char *path, int backlog) {
    int fd = sealpost_unix_bind(path);
    if (fd >= 0 && listen(fd, backlog) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int sealpost_accept_cloexec(int sock) {
    int fd;
    do {
        fd = accept4(sock, NULL, NULL, SOCK_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    return fd;
}

int sealpost_peer_uid(int sock, unsigned int *uid) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -1;
    if (len != sizeof cred) { errno = EINVAL; return -1; }
    *uid = cred.uid;
    return 0;
}

int sealpost_socketpair_cloexec(int fds[2]) {
    return socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds);
}

int sealpost_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int sealpost_spawn_addclosefrom(posix_spawn_file_actions_t *actions, int lowfd) {
    return posix_spawn_file_actions_addclosefrom_np(actions, lowfd);
}

int sealpost_set_parent_death_signal(int sig) { return prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0, 0, 0); }

int sealpost_wifexited(int status) { return WIFEXITED(status); }
int sealpost_wexitstatus(int status) { return WEXITSTATUS(status); }
int sealpost_wifsignaled(int status) { return WIFSIGNALED(status); }
int sealpost_wtermsig(int status) { return WTERMSIG(status); }

long sealpost_fs_type(const char *path) {
    struct statfs fs;
    if (statfs(path, &fs) != 0) return -1;
    return (long)fs.f_type;
}
