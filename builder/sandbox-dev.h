#ifndef IB_SANDBOX_DEV_H
#define IB_SANDBOX_DEV_H

/*
 * The /dev a step sees, in either runner: a tmpfs with these character
 * devices (mode 0666) and symlinks, and devpts and shm mounted on pts/ and
 * shm/.  Made by the namespace runner (builder/sandbox.c) and by the VM's
 * agent (init/agent.c).  Header only: the agent links nothing of the
 * builder.
 */

static const struct ib_dev_node {
	const char *name;
	unsigned maj, min;
} ib_dev_nodes[] = {
	{ "null", 1, 3 }, { "zero", 1, 5 }, { "full", 1, 7 },
	{ "random", 1, 8 }, { "urandom", 1, 9 }, { "tty", 5, 0 },
};

static const struct ib_dev_link {
	const char *name, *target;
} ib_dev_links[] = {
	{ "fd", "/proc/self/fd" }, { "stdin", "/proc/self/fd/0" },
	{ "stdout", "/proc/self/fd/1" }, { "stderr", "/proc/self/fd/2" },
	{ "ptmx", "pts/ptmx" },
};

#define IB_DEV_TMPFS_OPTS "mode=0755,size=65536k"
#define IB_DEV_PTS_OPTS "newinstance,ptmxmode=0666,mode=0620"
#define IB_DEV_SHM_OPTS "mode=1777,size=65536k"

#endif
