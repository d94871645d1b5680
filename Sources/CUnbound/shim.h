// libunbound for Swift: validating, asynchronous DNS resolution in-process.
// Everything Sealpost uses (ub_ctx_*, ub_resolve_async, ub_fd, ub_process,
// ub_cancel, struct ub_result) imports as is; no shims needed so far.
#ifndef SEALPOST_CUNBOUND_SHIM_H
#define SEALPOST_CUNBOUND_SHIM_H
#include <unbound.h>
#endif
