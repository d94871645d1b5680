// OpenSSL for Swift: macros that do not import get static inline shims here
// (PLATFORM.md lists which). Only the TLS module imports this target.
#ifndef SEALPOST_COPENSSL_SHIM_H
#define SEALPOST_COPENSSL_SHIM_H
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/bio.h>
#include <openssl/rand.h>
// The TLS relay engine is an epoll loop; Glibc's Swift module does not
// include <sys/epoll.h>, and the engine is the only user, so it rides here.
#include <sys/epoll.h>

// ---- Context settings (function-like macros over SSL_CTX_ctrl). ----

static inline int sealpost_ssl_ctx_set_min_proto(SSL_CTX *ctx, int v) { return (int)SSL_CTX_set_min_proto_version(ctx, v); }
static inline int sealpost_ssl_ctx_set_max_proto(SSL_CTX *ctx, int v) { return (int)SSL_CTX_set_max_proto_version(ctx, v); }
static inline long sealpost_ssl_ctx_set_mode(SSL_CTX *ctx, long mode) { return SSL_CTX_set_mode(ctx, mode); }
static inline int sealpost_ssl_ctx_set1_groups_list(SSL_CTX *ctx, const char *list) { return (int)SSL_CTX_set1_groups_list(ctx, list); }
static inline long sealpost_ssl_ctx_set_session_cache_mode(SSL_CTX *ctx, long mode) { return SSL_CTX_set_session_cache_mode(ctx, mode); }

typedef int (*sealpost_servername_cb)(SSL *ssl, int *alert, void *arg);
static inline long sealpost_ssl_ctx_set_servername_callback(SSL_CTX *ctx, sealpost_servername_cb cb, void *arg) {
    long r = SSL_CTX_set_tlsext_servername_callback(ctx, cb);
    SSL_CTX_set_tlsext_servername_arg(ctx, arg);
    return r;
}

// ---- Options and modes (SSL_OP_* do not import: they are 64-bit casts). ----

static inline uint64_t sealpost_ssl_op_no_compression(void) { return SSL_OP_NO_COMPRESSION; }
static inline uint64_t sealpost_ssl_op_no_renegotiation(void) { return SSL_OP_NO_RENEGOTIATION; }
static inline uint64_t sealpost_ssl_op_no_ticket(void) { return SSL_OP_NO_TICKET; }
/* 80 bytes: key name (16), HMAC secret (32), AES key (32). */
static inline int sealpost_ssl_ctx_set_tlsext_ticket_keys(SSL_CTX *ctx, unsigned char *keys, long length) {
    return (int)SSL_CTX_set_tlsext_ticket_keys(ctx, keys, length);
}
static inline uint64_t sealpost_ssl_op_cipher_server_preference(void) { return SSL_OP_CIPHER_SERVER_PREFERENCE; }
static inline long sealpost_ssl_mode_relay(void) {
    return SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS;
}

// ---- Per-connection settings and queries. ----

static inline int sealpost_ssl_set_tlsext_host_name(SSL *ssl, const char *name) { return (int)SSL_set_tlsext_host_name(ssl, name); }
static inline int sealpost_ssl_get_negotiated_group(SSL *ssl) { return (int)SSL_get_negotiated_group(ssl); }
static inline int sealpost_ssl_get_peer_tmp_key(SSL *ssl, EVP_PKEY **key) { return (int)SSL_get_peer_tmp_key(ssl, key); }
static inline int sealpost_ssl_get_tmp_key(SSL *ssl, EVP_PKEY **key) { return (int)SSL_get_tmp_key(ssl, key); }

// ---- Memory BIOs, names, frees. ----

static inline unsigned long sealpost_xn_flag_rfc2253(void) { return XN_FLAG_RFC2253; }

static inline long sealpost_bio_get_mem_data(BIO *bio, char **data) { return BIO_get_mem_data(bio, data); }
static inline void sealpost_openssl_free(void *p) { OPENSSL_free(p); }

// ---- Certificate and cipher stacks (sk_X509_*, sk_SSL_CIPHER_* are macros). ----

static inline int sealpost_sk_x509_num(const STACK_OF(X509) *sk) { return sk_X509_num(sk); }
static inline X509 *sealpost_sk_x509_value(const STACK_OF(X509) *sk, int i) { return sk_X509_value(sk, i); }
static inline int sealpost_sk_ssl_cipher_num(const STACK_OF(SSL_CIPHER) *sk) { return sk_SSL_CIPHER_num(sk); }
static inline const SSL_CIPHER *sealpost_sk_ssl_cipher_value(const STACK_OF(SSL_CIPHER) *sk, int i) { return sk_SSL_CIPHER_value(sk, i); }

#endif
