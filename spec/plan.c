#include "spec/plan.h"

#include <stdlib.h>
#include <string.h>

#include "lib/util.h"
#include "steps/step.h"

static char *python_canonical(const ib_python_pin *py)
{
	/* keyed by base, version and archive digest: every spec pinning it shares it */
	json_t *doc = json_pack("{s:{s:s, s:s, s:s, s:[s]}}", "python", "version", py->version, "release",
				py->release, "sha256", py->sha256, "packages", IB_PYTHON_RUNTIME_PACKAGE);
	char *s;

	if (!doc || !(s = json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENSURE_ASCII)))
		abort();
	json_decref(doc);
	return s;
}

int ib_plan_make(ib_plan **out, const ib_spec *spec, const ib_basedef *base, const ib_python_pin *python,
		 int64_t epoch)
{
	ib_plan *p;
	size_t n = 0;

	if (spec->python_version && (!python || strcmp(python->version, spec->python_version)))
		return ib_error_set("no python pin for python_version '%s'", spec->python_version);
	if (strcmp(base->name, spec->base))
		return ib_error_set("the spec's base is '%s', not '%s'", spec->base, base->name);
	p = ib_xcalloc(1, sizeof(*p));
	p->spec = spec;
	p->arch = ib_xstrdup(base->arch);
	p->machine = ib_xstrdup(base->machine);
	p->epoch = epoch;
	p->env = json_object();
	if (spec->python_version) {
		p->python = ib_xcalloc(1, sizeof(*p->python));
		*p->python = *python;
		p->python->url = ib_xstrdup(python->url ? python->url : "");
	}
	p->nlayers = 1 + (p->python ? 1 : 0) + spec->nsteps;
	p->layers = ib_xcalloc(p->nlayers, sizeof(*p->layers));

	p->layers[n].kind = "base";
	p->layers[n].canonical = ib_xasprintf("%s\nsource_date_epoch=%lld", base->canonical, (long long)epoch);
	ib_key_base(p->layers[n].key, p->layers[n].canonical);
	n++;
	if (p->python) {
		p->layers[n].kind = "python";
		p->layers[n].canonical = python_canonical(p->python);
		ib_key_step(p->layers[n].key, p->layers[n - 1].key, p->layers[n].canonical);
		n++;
	}
	for (size_t i = 0; i < spec->nsteps; i++, n++) {
		ib_plan_layer *l = &p->layers[n];

		l->kind = spec->steps[i].ops->name;
		l->step = &spec->steps[i];
		l->canonical = ib_step_canonical(&spec->steps[i]);
		ib_key_step(l->key, p->layers[n - 1].key, l->canonical);
		if (spec->steps[i].ops->flags & IB_STEP_ENV)
			json_object_update(p->env, spec->steps[i].arg);
	}
	ib_key_image(p->image_id, p->layers[p->nlayers - 1].key, spec->disk_size);
	*out = p;
	return 0;
}

void ib_plan_free(ib_plan *p)
{
	if (!p)
		return;
	for (size_t i = 0; i < p->nlayers; i++)
		free(p->layers[i].canonical);
	free(p->layers);
	free(p->arch);
	free(p->machine);
	ib_python_pin_clear(p->python);
	free(p->python);
	json_decref(p->env);
	free(p);
}

json_t *ib_plan_env_below(const ib_plan *p, size_t index)
{
	json_t *env = json_object();

	for (size_t i = 0; i < index && i < p->nlayers; i++)
		if (p->layers[i].step && (p->layers[i].step->ops->flags & IB_STEP_ENV))
			json_object_update(env, p->layers[i].step->arg);
	return env;
}
