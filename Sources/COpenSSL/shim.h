// OpenSSL for Swift: macros that do not import get static inline shims here.
#ifndef SEALPOST_COPENSSL_SHIM_H
#define SEALPOST_COPENSSL_SHIM_H
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <openssl/evp.h>
#endif
