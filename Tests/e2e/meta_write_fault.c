/* A fault for the end-to-end tests, preloaded into the queue
 * (LD_PRELOAD): pwrite(2) on a descriptor opened with O_DSYNC, which is
 * how LMDB writes a commit's meta page, fails with EIO while the trigger
 * file holds this process's pid. The trigger is $SEALPOST_FAULT_TRIGGER,
 * else "fail-meta-write" in the current directory: the data directory of
 * a queue started as root, which chroots there (the path is the same
 * before and after), so that no absolute path is needed. Any other write,
 * and any other process, is left alone: a queue the supervisor starts
 * again has another pid. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/types.h>
#include <unistd.h>

static int meta_write_fails(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || !(flags & O_DSYNC)) return 0;
    int saved = errno;
    char text[32] = {0};
    const char *trigger = getenv("SEALPOST_FAULT_TRIGGER");
    int file = open(trigger ? trigger : "fail-meta-write", O_RDONLY | O_CLOEXEC);
    if (file < 0) { errno = saved; return 0; }
    ssize_t n = read(file, text, sizeof text - 1);
    close(file);
    errno = saved;
    return n > 0 && atol(text) == (long)getpid();
}

ssize_t pwrite(int fd, const void *buffer, size_t count, off_t offset) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = (ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite");
    if (meta_write_fails(fd)) { errno = EIO; return -1; }
    return real(fd, buffer, count, offset);
}

ssize_t pwrite64(int fd, const void *buffer, size_t count, off_t offset) {
    return pwrite(fd, buffer, count, offset);
}
