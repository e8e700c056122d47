#ifndef IB_LIMITS_H
#define IB_LIMITS_H

/*
 * Every size a user (a spec, a request, a command line) controls has its
 * limit here, and only here.
 */

#define IB_ERROR_MAX		4096		/* one error message */
#define IB_SPEC_MAX_BYTES	(1024 * 1024)	/* a spec document */
#define IB_SPEC_MAX_STEPS	64		/* steps in one spec */
#define IB_STEP_MAX_ITEMS	512		/* packages/commands in one step */
#define IB_PKG_NAME_MAX		128		/* one Debian package name (+=version) */
#define IB_REQ_MAX		1024		/* one PEP 508 requirement */
#define IB_CMD_MAX		(64 * 1024)	/* one run_commands line */
#define IB_ENV_MAX_VARS		256		/* variables set by all env steps */
#define IB_ENV_NAME_MAX		128		/* an env variable name */
#define IB_ENV_VALUE_MAX	(32 * 1024)	/* an env variable value */
#define IB_LOG_TAIL_MAX		(8 * 1024)	/* log tail kept in errors */
#define IB_STEP_TIMEOUT_DEFAULT	1800		/* seconds, per build */
#define IB_TIMEOUT_MAX		(7 * 24 * 3600)	/* seconds */
#define IB_JSON_DEPTH_MAX	16		/* nesting of a spec document */
#define IB_DEFINITION_MAX	(1024 * 1024)	/* a base definition or the python version table */
#define IB_DISK_SIZE_DEFAULT	(4ULL << 30)	/* disk_size of an image when the spec names none */
#define IB_DISK_SIZE_MIN	(64ULL << 20)	/* the smallest disk_size */
#define IB_DISK_SIZE_MAX	(1ULL << 40)	/* the largest disk_size: 1 TiB */
#define IB_ENV_FILE_MAX		(1024 * 1024)	/* an image's /etc/environment, read to merge the env steps in */

/* What a step leaves: every walk of a layer (sealing, digests, export) stops at these. */
#define IB_TREE_DEPTH_MAX	256		/* directories nested in a layer */
#define IB_TREE_ENTRIES_MAX	(4 * 1024 * 1024) /* names in one layer */
#define IB_TREE_PATH_MAX	4096		/* bytes of a path in a layer, like PATH_MAX */
#define IB_TREE_LINK_NAMES_MAX	(64 << 20)	/* bytes of hard-linked names a tree copy remembers */

/* The BuildImage service (imagebuilder serve). */
#define IB_SERVE_BODY_MAX	(IB_SPEC_MAX_BYTES + 64 * 1024) /* one RPC request body */
#define IB_SERVE_TOKEN_MAX	4096		/* the bearer token file */
#define IB_SERVE_JOBS_MAX	64		/* --jobs: concurrent builds */
#define IB_SERVE_HTTP_THREADS_MAX 256		/* --http-threads */
#define IB_SERVE_QUEUE_MAX	1024		/* builds waiting for a builder */
#define IB_SERVE_CONNECTIONS_MAX 4096		/* open client connections */
#define IB_SERVE_CONN_MEMORY	(16 * 1024)	/* per connection: request line and headers, response headers */
#define IB_SERVE_IDLE_TIMEOUT	120		/* seconds a keep-alive connection may idle */
#define IB_SERVE_RECENT_MAX	256		/* finished builds kept in memory */
#define IB_SERVE_CANCEL_WAIT	10		/* seconds CancelBuild waits for the build to stop */
#define IB_SERVE_URL_MAX	2048		/* --public-url */
#define IB_BUILD_ID_MAX		64		/* a build id (with its NUL) */

#endif
