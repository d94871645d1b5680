#define _GNU_SOURCE
#include "CSystemShims.h"

FILE *sealpost_stderr(void) { return stderr; }
