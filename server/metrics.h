#ifndef IB_SERVER_METRICS_H
#define IB_SERVER_METRICS_H

/*
 * The service's metrics, rendered in the Prometheus text format (0.0.4).
 * Counters and histograms are lock-free (relaxed atomics): a request
 * thread updates them without contending with the others.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/util.h"

typedef enum ib_endpoint {
	IB_EP_BUILD_IMAGE,
	IB_EP_GET_BUILD,
	IB_EP_CANCEL_BUILD,
	IB_EP_GET_IMAGE,
	IB_EP_WATCH_BUILD,
	IB_EP_HEALTH,     /* grpc.health.v1.Health */
	IB_EP_REFLECTION, /* grpc.reflection.v1 and v1alpha */
	IB_EP_LOGS,
	IB_EP_ROOTFS,
	IB_EP_HEALTHZ,
	IB_EP_METRICS,
	IB_EP_OTHER,
	IB_EP_COUNT,
} ib_endpoint;

/* "BuildImage", "logs", ... (the label value) */
const char *ib_endpoint_name(ib_endpoint ep);

typedef enum ib_final_status {
	IB_FINAL_READY,
	IB_FINAL_FAILED,
	IB_FINAL_CANCELLED,
	IB_FINAL_TIMEOUT,
	IB_FINAL_COUNT,
} ib_final_status;

typedef struct ib_metrics ib_metrics;

ib_metrics *ib_metrics_new(void);
void ib_metrics_free(ib_metrics *m);

/* One HTTP request answered with status after seconds. */
void ib_metrics_request(ib_metrics *m, ib_endpoint ep, unsigned status, double seconds);

/* A BuildImage answered from the image cache (hit) or that needed a build (miss). */
void ib_metrics_image_lookup(ib_metrics *m, bool hit);

/* A build reached a final status after seconds of building. */
void ib_metrics_build(ib_metrics *m, ib_final_status status, double seconds);

/* A layer of a build: found in the cache, or built in seconds. */
void ib_metrics_layer(ib_metrics *m, const char *kind, bool cached, double seconds);

/* Response body bytes sent: artifacts (rootfs) or logs. */
void ib_metrics_bytes(ib_metrics *m, ib_endpoint ep, uint64_t bytes);

/* Gauges the caller samples at render time. */
typedef struct ib_metrics_gauges {
	unsigned queued;
	unsigned building;
	unsigned jobs;
	double uptime;
	bool draining;
} ib_metrics_gauges;

/* Append the exposition to out. */
void ib_metrics_render(ib_metrics *m, const ib_metrics_gauges *g, ib_buf *out);

#endif
