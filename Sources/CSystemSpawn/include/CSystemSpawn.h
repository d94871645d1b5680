// Process control for the supervisor: posix_spawn with descriptors placed and
// every other descriptor closed, wait-status decoding, a signalfd.
// Do not define _GNU_SOURCE here: this header is imported by Swift; the
// GNU-only calls (pipe2, posix_spawn_file_actions_addclosefrom_np) live in
// spawn.c.
#ifndef SEALPOST_CSYSTEMSPAWN_H
#define SEALPOST_CSYSTEMSPAWN_H
#include <sys/types.h>
#include <sys/wait.h>

/// Starts `path` with `argv` and `envp` (NULL-terminated) through
/// posix_spawn: descriptor 0 becomes `stdin_fd`, 1 and 2 become `output_fd`,
/// every descriptor from 3 up is closed in the child, the signal mask is
/// emptied and every signal disposition reset to its default. When
/// `new_process_group` is non-zero the child leads a process group of its own
/// (so a terminal's ^C reaches the supervisor only, which stops the stages in
/// order). No code of the caller runs between fork and exec.
/// Returns 0 and stores the child's pid, or an errno value.
int sealpost_spawn(pid_t *pid, const char *path, char *const argv[],
                   char *const envp[], int stdin_fd, int output_fd,
                   int new_process_group);

/// Like sealpost_spawn, but through fork and execve, for a child that is
/// handed descriptors (the systemd socket-activation convention): the
/// `passed_count` descriptors of `passed` become 3, 4, ... in the child
/// (close-on-exec cleared), every other descriptor from 3 up is closed.
/// When `pid_digits` is not NULL it points into one of the `envp` strings
/// (after "LISTEN_PID=") with room for `pid_digits_size` bytes: the child
/// writes its own pid there in decimal, NUL-terminated, before execve,
/// which posix_spawn cannot do (the parent learns the pid only after the
/// exec). Between fork and exec the child calls only async-signal-safe
/// functions (no malloc, no setenv). An exec failure is reported to the
/// parent through a close-on-exec pipe, as posix_spawn reports it.
/// Returns 0 and stores the child's pid, or an errno value.
int sealpost_spawn_passing(pid_t *pid, const char *path, char *const argv[],
                           char *const envp[], int stdin_fd, int output_fd,
                           int new_process_group, const int *passed,
                           int passed_count, char *pid_digits,
                           size_t pid_digits_size);

/// pipe2(fds, O_CLOEXEC); the read end (fds[0]) also O_NONBLOCK when
/// `nonblocking_read` is non-zero. Returns 0 or -1 with errno.
int sealpost_spawn_pipe(int fds[2], int nonblocking_read);

/// Blocks SIGTERM, SIGINT, SIGHUP and SIGCHLD in the calling thread and
/// returns a non-blocking, close-on-exec signalfd that reports them, or -1.
int sealpost_spawn_signalfd(void);

/// Reads one pending signal from a signalfd: its number, 0 when none is
/// pending, -1 on error.
int sealpost_spawn_read_signal(int fd);

/// The process environment (`environ`, a C global Swift 6 refuses to touch).
char *const *sealpost_spawn_environ(void);

// The wait-status macros do not import into Swift.
static inline int sealpost_spawn_wifexited(int status) { return WIFEXITED(status); }
static inline int sealpost_spawn_wexitstatus(int status) { return WEXITSTATUS(status); }
static inline int sealpost_spawn_wifsignaled(int status) { return WIFSIGNALED(status); }
static inline int sealpost_spawn_wtermsig(int status) { return WTERMSIG(status); }
static inline int sealpost_spawn_wcoredump(int status) { return WCOREDUMP(status); }

#endif
