// Glibc for Swift: macros and GNU-only calls that do not import.
// Do not define _GNU_SOURCE here: this header is imported by Swift.
#ifndef SEALPOST_CSYSTEMSHIMS_H
#define SEALPOST_CSYSTEMSHIMS_H
#include <stddef.h>
#include <stdio.h>
#include <sys/types.h>
#include <spawn.h>

/// The C `stderr` stream (a global Swift 6 refuses to touch).
FILE *sealpost_stderr(void);

/// The file system type (statfs(2) f_type, e.g. 0xEF53 for ext2/3/4) of the
/// file system holding `path`, or -1 with errno. <sys/vfs.h> does not import.
long sealpost_fs_type(const char *path);

// ---- Descriptor passing (SCM_RIGHTS): the CMSG_* macros do not import. ----

/// The most descriptors one frame may carry; a receive buffer holds this many.
#define SEALPOST_MAX_FDS 16

/// One sendmsg(2) of `len` bytes with `nfds` descriptors (0..SEALPOST_MAX_FDS)
/// as one SCM_RIGHTS control message, with MSG_NOSIGNAL. Returns the bytes
/// sent, or -1 with errno (EINVAL when nfds is too large). Not retried on
/// EINTR: the caller loops.
ssize_t sealpost_sendmsg_fds(int sock, const void *buf, size_t len,
                             const int *fds, size_t nfds);

/// As sealpost_sendmsg_fds, with extra sendmsg(2) flags (MSG_DONTWAIT: a
/// caller that must not block on a full socket buffer).
ssize_t sealpost_sendmsg_fds_flags(int sock, const void *buf, size_t len,
                                   const int *fds, size_t nfds, int flags);

/// One recvmsg(2) into `buf` with MSG_CMSG_CLOEXEC. Descriptors received
/// (every SCM_RIGHTS message, in order) are stored in `fds`, up to `maxfds`,
/// their number in `*nfds`; descriptors beyond `maxfds` are closed. `*truncated`
/// is set to 1 when descriptors were lost (MSG_CTRUNC or more than `maxfds`).
/// Returns the bytes received (0 at EOF), or -1 with errno.
ssize_t sealpost_recvmsg_fds(int sock, void *buf, size_t len,
                             int *fds, size_t maxfds, size_t *nfds, int *truncated);

/// A connected AF_UNIX stream socket (close-on-exec) to `path`, or -1 with
/// errno (ENAMETOOLONG when the path does not fit in sun_path).
int sealpost_unix_connect(const char *path);

/// The same, but a connect that waits for room in a full listen backlog
/// gives up after `timeout_ms` (> 0) with EAGAIN; 0: wait as long as it takes.
int sealpost_unix_connect_timeout(const char *path, int timeout_ms);

/// A listening AF_UNIX stream socket (close-on-exec) bound to `path` (which
/// must not exist), or -1 with errno.
int sealpost_unix_listen(const char *path, int backlog);

/// The same, bound but not yet listening (the caller sets the file's mode
/// first: until listen(2), connections are refused rather than denied).
int sealpost_unix_bind(const char *path);

/// accept4(2) with SOCK_CLOEXEC, retried on EINTR.
int sealpost_accept_cloexec(int sock);

/// The uid of the process at the other end of Unix socket `sock`
/// (SO_PEERCRED: as it was at connect(2)); 0 or -1 with errno.
int sealpost_peer_uid(int sock, unsigned int *uid);

/// socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC); 0 or -1 with errno.
int sealpost_socketpair_cloexec(int fds[2]);

// ---- Processes: GNU-only calls and wait-status macros. ----

/// pipe2(fds, O_CLOEXEC).
int sealpost_pipe_cloexec(int fds[2]);

/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34+).
int sealpost_spawn_addclosefrom(posix_spawn_file_actions_t *actions, int lowfd);

/// prctl(PR_SET_PDEATHSIG, sig): `sig` when the parent (the thread that
/// created this process) dies. Cleared by a change of credentials.
int sealpost_set_parent_death_signal(int sig);

int sealpost_wifexited(int status);
int sealpost_wexitstatus(int status);
int sealpost_wifsignaled(int status);
int sealpost_wtermsig(int status);

#endif
