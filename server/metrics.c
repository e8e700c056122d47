#include "server/metrics.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BUCKETS 16

typedef struct histogram {
	const double *bounds; /* upper bounds, ascending; +Inf is implicit */
	size_t nbounds;
	atomic_uint_least64_t counts[MAX_BUCKETS + 1]; /* per bucket, not cumulative */
	atomic_uint_least64_t sum_us;                  /* sum of observations, microseconds */
} histogram;

static const double request_bounds[] = { 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5 };
static const double build_bounds[] = { 1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600 };
static const double step_bounds[] = { 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800 };

/* The HTTP statuses counted one by one; others fall into "other". */
static const unsigned statuses[] = { 200, 206, 304, 400, 401, 404, 405, 415, 416, 429, 499, 500, 501, 503 };
#define NSTATUS (sizeof(statuses) / sizeof(statuses[0]))

/* Layer kinds; the last entry catches any kind added later. */
static const char *const kinds[] = { "base", "python", "apt_install", "pip_install", "run_commands", "env", "other" };
#define NKINDS (sizeof(kinds) / sizeof(kinds[0]))

static const char *const endpoint_names[IB_EP_COUNT] = {
	[IB_EP_BUILD_IMAGE] = "BuildImage", [IB_EP_GET_BUILD] = "GetBuild", [IB_EP_CANCEL_BUILD] = "CancelBuild",
	[IB_EP_GET_IMAGE] = "GetImage",     [IB_EP_WATCH_BUILD] = "WatchBuild", [IB_EP_HEALTH] = "health",
	[IB_EP_REFLECTION] = "reflection",  [IB_EP_LOGS] = "logs",           [IB_EP_ROOTFS] = "rootfs",
	[IB_EP_HEALTHZ] = "healthz",        [IB_EP_METRICS] = "metrics",     [IB_EP_OTHER] = "other",
};

static const char *const final_names[IB_FINAL_COUNT] = { "READY", "FAILED", "CANCELLED", "TIMEOUT" };

struct ib_metrics {
	atomic_uint_least64_t requests[IB_EP_COUNT][NSTATUS + 1];
	histogram request_seconds[IB_EP_COUNT];
	atomic_uint_least64_t image_hits, image_misses;
	atomic_uint_least64_t builds[IB_FINAL_COUNT];
	histogram build_seconds;
	atomic_uint_least64_t layer_hits[NKINDS], layer_misses[NKINDS];
	histogram step_seconds[NKINDS];
	atomic_uint_least64_t bytes[IB_EP_COUNT];
};

const char *ib_endpoint_name(ib_endpoint ep)
{
	return (unsigned)ep < IB_EP_COUNT ? endpoint_names[ep] : "other";
}

static void histogram_init(histogram *h, const double *bounds, size_t n)
{
	h->bounds = bounds;
	h->nbounds = n < MAX_BUCKETS ? n : MAX_BUCKETS;
}

static void observe(histogram *h, double v)
{
	size_t i = 0;

	while (i < h->nbounds && v > h->bounds[i])
		i++;
	atomic_fetch_add_explicit(&h->counts[i], 1, memory_order_relaxed);
	if (v > 0)
		atomic_fetch_add_explicit(&h->sum_us, (uint64_t)(v * 1e6), memory_order_relaxed);
}

ib_metrics *ib_metrics_new(void)
{
	ib_metrics *m = ib_xcalloc(1, sizeof(*m));

	for (size_t i = 0; i < IB_EP_COUNT; i++)
		histogram_init(&m->request_seconds[i], request_bounds,
			       sizeof(request_bounds) / sizeof(request_bounds[0]));
	histogram_init(&m->build_seconds, build_bounds, sizeof(build_bounds) / sizeof(build_bounds[0]));
	for (size_t i = 0; i < NKINDS; i++)
		histogram_init(&m->step_seconds[i], step_bounds, sizeof(step_bounds) / sizeof(step_bounds[0]));
	return m;
}

void ib_metrics_free(ib_metrics *m)
{
	free(m);
}

static uint64_t load(atomic_uint_least64_t *v)
{
	return atomic_load_explicit(v, memory_order_relaxed);
}

static void inc(atomic_uint_least64_t *v, uint64_t n)
{
	atomic_fetch_add_explicit(v, n, memory_order_relaxed);
}

void ib_metrics_request(ib_metrics *m, ib_endpoint ep, unsigned status, double seconds)
{
	size_t i = 0;

	if ((unsigned)ep >= IB_EP_COUNT)
		ep = IB_EP_OTHER;
	while (i < NSTATUS && statuses[i] != status)
		i++;
	inc(&m->requests[ep][i], 1);
	observe(&m->request_seconds[ep], seconds);
}

void ib_metrics_image_lookup(ib_metrics *m, bool hit)
{
	inc(hit ? &m->image_hits : &m->image_misses, 1);
}

void ib_metrics_build(ib_metrics *m, ib_final_status status, double seconds)
{
	if ((unsigned)status >= IB_FINAL_COUNT)
		return;
	inc(&m->builds[status], 1);
	observe(&m->build_seconds, seconds);
}

static size_t kind_index(const char *kind)
{
	size_t i = 0;

	while (i < NKINDS - 1 && strcmp(kinds[i], kind))
		i++;
	return i;
}

void ib_metrics_layer(ib_metrics *m, const char *kind, bool cached, double seconds)
{
	size_t k = kind_index(kind);

	if (cached) {
		inc(&m->layer_hits[k], 1);
		return;
	}
	inc(&m->layer_misses[k], 1);
	observe(&m->step_seconds[k], seconds);
}

void ib_metrics_bytes(ib_metrics *m, ib_endpoint ep, uint64_t bytes)
{
	if ((unsigned)ep < IB_EP_COUNT)
		inc(&m->bytes[ep], bytes);
}

static void header(ib_buf *out, const char *name, const char *type, const char *help)
{
	ib_buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Buckets of h with labels (a "k=\"v\"," prefix, or ""). */
static void render_histogram(ib_buf *out, const char *name, const char *labels, histogram *h)
{
	uint64_t cum = 0;

	for (size_t i = 0; i <= h->nbounds; i++) {
		cum += load(&h->counts[i]);
		if (i < h->nbounds)
			ib_buf_printf(out, "%s_bucket{%sle=\"%g\"} %llu\n", name, labels, h->bounds[i],
				      (unsigned long long)cum);
		else
			ib_buf_printf(out, "%s_bucket{%sle=\"+Inf\"} %llu\n", name, labels, (unsigned long long)cum);
	}
	/* labels end with a comma when present: drop it inside {} */
	if (*labels)
		ib_buf_printf(out, "%s_sum{%.*s} %.6f\n%s_count{%.*s} %llu\n", name, (int)strlen(labels) - 1, labels,
			      (double)load(&h->sum_us) / 1e6, name, (int)strlen(labels) - 1, labels,
			      (unsigned long long)cum);
	else
		ib_buf_printf(out, "%s_sum %.6f\n%s_count %llu\n", name, (double)load(&h->sum_us) / 1e6, name,
			      (unsigned long long)cum);
}

void ib_metrics_render(ib_metrics *m, const ib_metrics_gauges *g, ib_buf *out)
{
	char labels[128];

	header(out, "imagebuilder_builds_total", "counter", "Builds that reached a final status, by status.");
	for (size_t i = 0; i < IB_FINAL_COUNT; i++)
		ib_buf_printf(out, "imagebuilder_builds_total{status=\"%s\"} %llu\n", final_names[i],
			      (unsigned long long)load(&m->builds[i]));

	header(out, "imagebuilder_image_cache_hits_total", "counter",
	       "BuildImage calls answered from the image cache.");
	ib_buf_printf(out, "imagebuilder_image_cache_hits_total %llu\n", (unsigned long long)load(&m->image_hits));
	header(out, "imagebuilder_image_cache_misses_total", "counter",
	       "BuildImage calls that needed a build (new or joined).");
	ib_buf_printf(out, "imagebuilder_image_cache_misses_total %llu\n",
		      (unsigned long long)load(&m->image_misses));

	header(out, "imagebuilder_layer_cache_hits_total", "counter", "Layers of builds found in the cache, by kind.");
	for (size_t i = 0; i < NKINDS; i++)
		ib_buf_printf(out, "imagebuilder_layer_cache_hits_total{kind=\"%s\"} %llu\n", kinds[i],
			      (unsigned long long)load(&m->layer_hits[i]));
	header(out, "imagebuilder_layer_cache_misses_total", "counter", "Layers of builds that were built, by kind.");
	for (size_t i = 0; i < NKINDS; i++)
		ib_buf_printf(out, "imagebuilder_layer_cache_misses_total{kind=\"%s\"} %llu\n", kinds[i],
			      (unsigned long long)load(&m->layer_misses[i]));

	header(out, "imagebuilder_build_duration_seconds", "histogram",
	       "Time from a build's start to its final status.");
	render_histogram(out, "imagebuilder_build_duration_seconds", "", &m->build_seconds);
	header(out, "imagebuilder_step_duration_seconds", "histogram", "Time to build one layer, by kind.");
	for (size_t i = 0; i < NKINDS; i++) {
		snprintf(labels, sizeof(labels), "kind=\"%s\",", kinds[i]);
		render_histogram(out, "imagebuilder_step_duration_seconds", labels, &m->step_seconds[i]);
	}

	header(out, "imagebuilder_queue_depth", "gauge", "Builds waiting for a builder.");
	ib_buf_printf(out, "imagebuilder_queue_depth %u\n", g->queued);
	header(out, "imagebuilder_builds_running", "gauge", "Builds running now.");
	ib_buf_printf(out, "imagebuilder_builds_running %u\n", g->building);
	header(out, "imagebuilder_builders", "gauge", "Configured concurrent builds (--jobs).");
	ib_buf_printf(out, "imagebuilder_builders %u\n", g->jobs);
	header(out, "imagebuilder_draining", "gauge", "1 while shutting down.");
	ib_buf_printf(out, "imagebuilder_draining %d\n", g->draining ? 1 : 0);
	header(out, "imagebuilder_uptime_seconds", "gauge", "Seconds since the service started.");
	ib_buf_printf(out, "imagebuilder_uptime_seconds %.3f\n", g->uptime);

	header(out, "imagebuilder_served_bytes_total", "counter",
	       "Response body bytes of completed downloads, by endpoint.");
	ib_buf_printf(out, "imagebuilder_served_bytes_total{endpoint=\"rootfs\"} %llu\n",
		      (unsigned long long)load(&m->bytes[IB_EP_ROOTFS]));
	ib_buf_printf(out, "imagebuilder_served_bytes_total{endpoint=\"logs\"} %llu\n",
		      (unsigned long long)load(&m->bytes[IB_EP_LOGS]));

	header(out, "imagebuilder_http_requests_total", "counter", "HTTP requests, by endpoint and status.");
	for (size_t e = 0; e < IB_EP_COUNT; e++)
		for (size_t i = 0; i <= NSTATUS; i++) {
			uint64_t n = load(&m->requests[e][i]);
			if (!n)
				continue;
			if (i < NSTATUS)
				ib_buf_printf(out, "imagebuilder_http_requests_total{endpoint=\"%s\",code=\"%u\"} %llu\n",
					      endpoint_names[e], statuses[i], (unsigned long long)n);
			else
				ib_buf_printf(out,
					      "imagebuilder_http_requests_total{endpoint=\"%s\",code=\"other\"} %llu\n",
					      endpoint_names[e], (unsigned long long)n);
		}
	header(out, "imagebuilder_http_request_duration_seconds", "histogram",
	       "Time to answer a request (to the response being queued), by endpoint.");
	for (size_t e = 0; e < IB_EP_COUNT; e++) {
		snprintf(labels, sizeof(labels), "endpoint=\"%s\",", endpoint_names[e]);
		render_histogram(out, "imagebuilder_http_request_duration_seconds", labels, &m->request_seconds[e]);
	}
}
