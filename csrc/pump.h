/* Moving bytes between the two sides of a connection (pump.c). */
#ifndef SCISTREAM_PUMP_H
#define SCISTREAM_PUMP_H

#include "internal.h"

/* Give a direction its buffer: a pipe (splice) when both legs are plain, else
 * (or when a pipe cannot be had) a userspace buffer of tls_buffer_size bytes. */
int dir_setup(struct s2_engine *e, struct dir *d, int want_pipe);
void dir_release(struct s2_engine *e, struct dir *d);
/* Move bytes both ways until nothing moves; handles half-close, resets, close. */
void conn_pump(struct conn *c);

#endif
