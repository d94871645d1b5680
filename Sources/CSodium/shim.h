// libsodium for Swift. Only the *_MESSAGEBYTES_MAX constants fail to import.
#ifndef SEALPOST_CSODIUM_SHIM_H
#define SEALPOST_CSODIUM_SHIM_H
#include <sodium.h>
#endif
