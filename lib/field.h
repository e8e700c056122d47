#ifndef IB_FIELD_H
#define IB_FIELD_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "lib/error.h"

/*
 * Messages about user input (a spec, a request): every rejection names the
 * field at fault first ("steps[1].apt_install[0]: ..."), quotes what the
 * user gave in one safe shape, and is IB_EINVALID.  Shared by the spec
 * parser, the step kinds and the service.
 */

/* Set the message (printf-style) and return IB_EINVALID. */
int ib_field_invalid(const char *fmt, ...) IB_PRINTF(1, 2);

/* Size of the buffer ib_field_quote() writes into. */
#define IB_FIELD_QUOTE_MAX 80

/*
 * Render len bytes of user input for a message: in single quotes, bytes
 * outside printable ASCII escaped as \xNN, \ and ' with a backslash, cut
 * short with "..." when long.  The result is plain ASCII whatever the input,
 * so a message stays valid UTF-8 and safe on a terminal.  Returns buf.
 */
const char *ib_field_quote(char buf[IB_FIELD_QUOTE_MAX], const char *s, size_t len);

/* "an object", "a string", ...: the JSON type of v, for messages. */
const char *ib_field_type_name(const json_t *v);

/* Is name a POSIX environment variable name ([A-Za-z_][A-Za-z0-9_]*)? */
bool ib_field_env_name_ok(const char *name);

#endif
