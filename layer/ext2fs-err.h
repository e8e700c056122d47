#ifndef IB_EXT2FS_ERR_H
#define IB_EXT2FS_ERR_H

#include <ext2fs/ext2fs.h>

#include "lib/error.h"

/*
 * libext2fs's error codes, for the ext4 writer (ext4.c) and reader
 * (ext4read.c): its error table registered once a process, and a message
 * with the code's text appended.
 */
void ib_ext2fs_init(void);

/* Set "<fmt...>: <the code's message>"; returns IB_ERROR. */
int ib_ext2fs_error(errcode_t code, const char *fmt, ...) IB_PRINTF(2, 3);

#endif
