// Glibc for Swift: macros and GNU-only calls that do not import.
// Do not define _GNU_SOURCE here: this header is imported by Swift.
#ifndef SEALPOST_CSYSTEMSHIMS_H
#define SEALPOST_CSYSTEMSHIMS_H
#include <stddef.h>
#include <stdio.h>
#include <sys/types.h>

/// The C `stderr` stream (a global Swift 6 refuses to touch).
FILE *sealpost_stderr(void);

#endif
