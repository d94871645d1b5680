/* bench/tls-client: the load generator of bench/tls, in C so that it costs
 * the shared 2 cores as little as possible (the Python one burned about
 * 1.35 ms of CPU per message, as much as a third of a server).
 *
 *   tls-client MODE PORT SESSIONS TOTAL RECIPIENT
 *
 * MODE: message    220, EHLO, STARTTLS, full handshake, EHLO, MAIL, RCPT,
 *                  DATA, 1 KiB body, 250, QUIT, 221, close_notify
 *       handshake  220, EHLO, STARTTLS, full handshake, QUIT, 221
 *       plain      message without STARTTLS (against smtp-sink)
 *       bare       a TLS handshake right after connect (openssl s_server)
 *
 * One thread per session, blocking I/O, each thread running its share of
 * TOTAL back to back. Every connection is a new SSL from one SSL_CTX with
 * no session cache, tickets received and dropped: a full handshake each time,
 * TLS 1.3 with X25519, no verification (RFC 7435 opportunistic TLS, as
 * bench/tls's Python client). Strict: any reply other than the one
 * expected fails that message (counted, the first reason kept).
 *
 * Output, one line on stdout once all threads are done:
 *   ok=N failed=N seconds=S
 * then, if any failed, "error: ..." lines (the first few distinct reasons).
 * seconds: wall clock from the moment every thread is ready to the last
 * message. Exit status 0 even with failures (the caller decides); 2 on
 * usage or set-up errors.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum mode { MESSAGE, HANDSHAKE, PLAIN, BARE };

static enum mode mode;
static int port;
static const char *recipient;
static SSL_CTX *ctx;
static char body[2048];
static size_t body_len;
static pthread_barrier_t barrier;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long total_ok, total_failed;
#define MAX_REASONS 5
static char reasons[MAX_REASONS][256];
static int nreasons;

struct conn {
    int fd;
    SSL *ssl;           /* NULL before STARTTLS */
    char buf[4096];
    size_t start, end;
    char why[200];      /* the reason of a failure */
};

static int fail(struct conn *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->why, sizeof c->why, fmt, ap);
    va_end(ap);
    return -1;
}

static int ssl_fail(struct conn *c, const char *what, int r) {
    int e = SSL_get_error(c->ssl, r);
    unsigned long q = ERR_get_error();
    char text[120] = "";
    if (q) ERR_error_string_n(q, text, sizeof text);
    ERR_clear_error();
    return fail(c, "%s: SSL error %d%s%s%s", what, e, e == SSL_ERROR_SYSCALL ? " " : "",
                e == SSL_ERROR_SYSCALL ? strerror(errno) : "", text[0] ? text : "");
}

static int send_all(struct conn *c, const char *data, size_t n, const char *what) {
    if (c->ssl) {
        /* One record per command (SSL_write writes it all: no partial
         * writes without SSL_MODE_ENABLE_PARTIAL_WRITE). */
        int r = SSL_write(c->ssl, data, (int)n);
        if (r <= 0) return ssl_fail(c, what, r);
        return 0;
    }
    while (n > 0) {
        ssize_t w = send(c->fd, data, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return fail(c, "%s: send: %s", what, strerror(errno));
        }
        data += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Reads more bytes into the buffer; 0 on success. */
static int fill(struct conn *c, const char *what) {
    if (c->start == c->end) c->start = c->end = 0;
    if (c->end == sizeof c->buf) return fail(c, "%s: reply line too long", what);
    if (c->ssl) {
        int r = SSL_read(c->ssl, c->buf + c->end, (int)(sizeof c->buf - c->end));
        if (r <= 0) {
            if (SSL_get_error(c->ssl, r) == SSL_ERROR_ZERO_RETURN) return fail(c, "%s: close_notify instead of a reply", what);
            return ssl_fail(c, what, r);
        }
        c->end += (size_t)r;
        return 0;
    }
    for (;;) {
        ssize_t r = recv(c->fd, c->buf + c->end, sizeof c->buf - c->end, 0);
        if (r > 0) { c->end += (size_t)r; return 0; }
        if (r == 0) return fail(c, "%s: connection closed instead of a reply", what);
        if (errno != EINTR) return fail(c, "%s: recv: %s", what, strerror(errno));
    }
}

/* Reads one (possibly multiline) reply and checks its code. */
static int expect(struct conn *c, int code, const char *what) {
    for (;;) {
        char *line = c->buf + c->start;
        char *nl = memchr(line, '\n', c->end - c->start);
        if (!nl) {
            if (fill(c, what)) return -1;
            continue;
        }
        size_t len = (size_t)(nl - line) + 1;
        c->start += len;
        if (len < 5 || line[0] < '2' || line[0] > '5' || line[1] < '0' || line[1] > '9' || line[2] < '0' || line[2] > '9'
            || (line[3] != ' ' && line[3] != '-' && line[3] != '\r'))
            return fail(c, "%s: malformed reply line \"%.*s\"", what, (int)(len > 80 ? 80 : len - 1), line);
        int got = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
        if (got != code)
            return fail(c, "%s: \"%.*s\" instead of %d", what, (int)(len > 80 ? 80 : len - 2), line, code);
        if (line[3] != '-') {
            if (c->start != c->end)
                return fail(c, "%s: unexpected bytes after the reply (no pipelining was asked)", what);
            return 0;
        }
    }
}

static int handshake(struct conn *c) {
    c->ssl = SSL_new(ctx);
    if (!c->ssl) return fail(c, "SSL_new failed");
    SSL_set_fd(c->ssl, c->fd);
    int r = SSL_connect(c->ssl);
    if (r != 1) return ssl_fail(c, "handshake", r);
    return 0;
}

#define SEND(c, s, what) send_all(c, s, sizeof(s) - 1, what)

static int session(struct conn *c, const char *rcpt_line, size_t rcpt_len) {
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0) return fail(c, "socket: %s", strerror(errno));
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0) return fail(c, "connect: %s", strerror(errno));
    if (mode == BARE) return handshake(c);
    if (expect(c, 220, "greeting")) return -1;
    if (mode != PLAIN) {
        if (SEND(c, "EHLO bench.client\r\n", "EHLO") || expect(c, 250, "EHLO")) return -1;
        if (SEND(c, "STARTTLS\r\n", "STARTTLS") || expect(c, 220, "STARTTLS")) return -1;
        if (handshake(c)) return -1;
        if (mode == HANDSHAKE) return SEND(c, "QUIT\r\n", "QUIT") || expect(c, 221, "QUIT") ? -1 : 0;
    }
    if (SEND(c, "EHLO bench.client\r\n", "EHLO") || expect(c, 250, "EHLO")) return -1;
    if (SEND(c, "MAIL FROM:<bench@bench.test>\r\n", "MAIL") || expect(c, 250, "MAIL")) return -1;
    if (send_all(c, rcpt_line, rcpt_len, "RCPT") || expect(c, 250, "RCPT")) return -1;
    if (SEND(c, "DATA\r\n", "DATA") || expect(c, 354, "DATA")) return -1;
    if (send_all(c, body, body_len, "message") || expect(c, 250, "end of data")) return -1;
    if (SEND(c, "QUIT\r\n", "QUIT") || expect(c, 221, "QUIT")) return -1;
    if (c->ssl) SSL_shutdown(c->ssl);   /* close_notify, as a well-behaved client; no wait for the peer's */
    return 0;
}

static void note(const char *why) {
    pthread_mutex_lock(&lock);
    int seen = 0;
    for (int i = 0; i < nreasons; i++) seen |= strcmp(reasons[i], why) == 0;
    if (!seen && nreasons < MAX_REASONS) snprintf(reasons[nreasons++], sizeof reasons[0], "%s", why);
    pthread_mutex_unlock(&lock);
}

static void *worker(void *arg) {
    long count = (long)arg, ok = 0, failed = 0;
    char rcpt[512];
    int rcpt_len = snprintf(rcpt, sizeof rcpt, "RCPT TO:<%s>\r\n", recipient);
    struct conn *c = malloc(sizeof *c);
    pthread_barrier_wait(&barrier);
    for (long i = 0; i < count; i++) {
        c->ssl = NULL;
        c->start = c->end = 0;
        c->why[0] = 0;
        if (session(c, rcpt, (size_t)rcpt_len) == 0) {
            ok++;
        } else {
            failed++;
            note(c->why);
            ERR_clear_error();
        }
        if (c->ssl) SSL_free(c->ssl);
        if (c->fd >= 0) close(c->fd);
    }
    free(c);
    pthread_mutex_lock(&lock);
    total_ok += ok;
    total_failed += failed;
    pthread_mutex_unlock(&lock);
    return NULL;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: tls-client message|handshake|plain|bare PORT SESSIONS TOTAL RECIPIENT\n");
        return 2;
    }
    if (!strcmp(argv[1], "message")) mode = MESSAGE;
    else if (!strcmp(argv[1], "handshake")) mode = HANDSHAKE;
    else if (!strcmp(argv[1], "plain")) mode = PLAIN;
    else if (!strcmp(argv[1], "bare")) mode = BARE;
    else { fprintf(stderr, "tls-client: unknown mode %s\n", argv[1]); return 2; }
    port = atoi(argv[2]);
    long sessions = atol(argv[3]), total = atol(argv[4]);
    recipient = argv[5];
    if (port <= 0 || sessions <= 0 || total < sessions) { fprintf(stderr, "tls-client: bad numbers\n"); return 2; }

    /* As the Python client's body: header, 78-character lines, exactly
     * 1024 bytes, then the end-of-data line. */
    body_len = (size_t)snprintf(body, sizeof body, "From: bench@bench.test\r\nSubject: bench/tls\r\n\r\n");
    while (body_len < 1024 - 80) {
        memset(body + body_len, 'x', 78);
        memcpy(body + body_len + 78, "\r\n", 2);
        body_len += 80;
    }
    size_t fillers = 1024 - body_len - 2;
    memset(body + body_len, 'y', fillers);
    body_len += fillers;
    memcpy(body + body_len, "\r\n.\r\n", 5);
    body_len += 5;

    ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) { fprintf(stderr, "tls-client: SSL_CTX_new failed\n"); return 2; }
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set1_groups_list(ctx, "X25519");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    /* No session kept: tickets the server sends are read and dropped (as
     * Python's client did), so each connection is a full handshake. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);

    pthread_barrier_init(&barrier, NULL, (unsigned)sessions + 1);
    pthread_t *threads = calloc((size_t)sessions, sizeof *threads);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (long i = 0; i < sessions; i++) {
        long share = total / sessions + (i < total % sessions ? 1 : 0);
        if (pthread_create(&threads[i], &attr, worker, (void *)share) != 0) {
            fprintf(stderr, "tls-client: pthread_create failed\n");
            return 2;
        }
    }
    pthread_barrier_wait(&barrier);
    double started = now();
    for (long i = 0; i < sessions; i++) pthread_join(threads[i], NULL);
    double seconds = now() - started;
    printf("ok=%ld failed=%ld seconds=%.6f\n", total_ok, total_failed, seconds);
    for (int i = 0; i < nreasons; i++) printf("error: %s\n", reasons[i]);
    SSL_CTX_free(ctx);
    return 0;
}
