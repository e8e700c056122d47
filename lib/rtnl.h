#ifndef IB_RTNL_H
#define IB_RTNL_H

/*
 * The two rtnetlink primitives the builder (a step's routing rules) and
 * ib-init (a booted image's address and routes) share.  Only libc, so the
 * static init links it too.
 */

#include <stddef.h>
#include <linux/netlink.h>

/*
 * Append an attribute after the message's current end.  The caller's
 * buffer behind nh has room for it.
 */
void ib_rtnl_add_attr(struct nlmsghdr *nh, unsigned short type, const void *data, size_t len);

/* Send one request on a NETLINK_ROUTE socket, read its acknowledgement: 0, or an errno. */
int ib_rtnl_talk(int fd, struct nlmsghdr *nh);

#endif
