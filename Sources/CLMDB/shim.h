// LMDB for Swift. Flags import as Int32; MDB_VERSION_STRING does not (use mdb_version).
#ifndef SEALPOST_CLMDB_SHIM_H
#define SEALPOST_CLMDB_SHIM_H
#include <lmdb.h>
#endif
