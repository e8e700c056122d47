# imagebuilder: one core library, one program, tests and benchmarks.
#
#   make              build build/imagebuilder
#   make demo         install dependencies, build the example image
#   make test         install dependencies, run unit and integration tests
#   make unit-test    the unit programs only (with SANITIZE=..., sanitized)
#   make check        folders are layers, gcc -fanalyzer, warnings are errors
#   make fresh-check  the README's two commands in a clean Debian root
#   make bench        benchmarks against the hand-written pipeline
#   make SANITIZE=address,undefined test

CC ?= cc
BUILD ?= build
PKGS = libarchive openssl sqlite3 ext2fs com_err jansson libcurl libgit2 libmicrohttpd libzstd libseccomp \
       libprotobuf-c zlib libnghttp2

WARN = -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
       -Wformat-security -Wwrite-strings -Wvla -fno-common
ifneq ($(CI),)
WARN += -Werror
endif
ifneq ($(WERROR),)
WARN += -Werror
endif

CFLAGS ?= -O2 -g
ALL_CFLAGS = -std=c11 -D_GNU_SOURCE $(WARN) $(CFLAGS) -include lib/banned.h \
	-I. -I$(BUILD)/gen $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LIBS = $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lpthread
ifneq ($(SANITIZE),)
ALL_CFLAGS += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer
LDFLAGS += -fsanitize=$(SANITIZE)
endif

LIB_DIRS = lib steps spec layer cache builder server
LIB_SRC = $(sort $(foreach d,$(LIB_DIRS),$(wildcard $(d)/*.c)))
CLI_SRC = $(sort $(wildcard cli/*.c))
UNIT_SRC = $(sort $(wildcard tests/unit/test-*.c))

# The BuildImage schema: C (protoc-c) and the descriptor set that reflection
# serves, made at build time; nothing generated is checked in.
# The gRPC health and reflection services' schemas are in proto/grpc;
# descriptor.proto is what reflection reads the descriptor set with.
PROTO = imagebuilder/v1/imagebuilder.proto
# v1alpha of reflection is v1 in another package: made from it, not kept twice.
PROTO_GRPC = grpc/health/v1/health.proto grpc/reflection/v1/reflection.proto grpc/reflection/v1alpha/reflection.proto
PROTO_WKT = google/protobuf/struct.proto google/protobuf/timestamp.proto google/protobuf/wrappers.proto \
	google/protobuf/descriptor.proto
GEN = $(BUILD)/gen
GEN_SRC = $(PROTO:%.proto=$(GEN)/%.pb-c.c) $(PROTO_GRPC:%.proto=$(GEN)/%.pb-c.c) \
	$(PROTO_WKT:%.proto=$(GEN)/%.pb-c.c) $(GEN)/descriptor-set.c
GEN_OBJ = $(GEN_SRC:$(GEN)/%.c=$(BUILD)/obj/gen/%.o)

LIB_OBJ = $(LIB_SRC:%.c=$(BUILD)/obj/%.o) $(GEN_OBJ)
CLI_OBJ = $(CLI_SRC:%.c=$(BUILD)/obj/%.o)
UNIT_BIN = $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)

# A change of flags (e.g. SANITIZE) rebuilds everything.
FLAGS_STAMP = $(BUILD)/.flags
$(shell mkdir -p $(BUILD) && echo '$(CC) $(ALL_CFLAGS) $(LDFLAGS)' | cmp -s - $(FLAGS_STAMP) || echo '$(CC) $(ALL_CFLAGS) $(LDFLAGS)' > $(FLAGS_STAMP))

# The init installed into images without one: static, one per machine,
# cross-compiled for the machine that is not the host.  Never sanitized.
HOST_MACHINE := $(shell uname -m)
INIT_MACHINES = x86_64 aarch64
INIT_BINS = $(INIT_MACHINES:%=$(BUILD)/ib-init-%)
init_cc = $(if $(filter $(1),$(HOST_MACHINE)),$(CC),$(1)-linux-gnu-gcc)
INIT_CFLAGS = -static -Os -s -std=c11 -D_GNU_SOURCE $(WARN) -include lib/banned.h

# The sandbox's PID 1, exec'd fresh in every build step: static, the host's machine.
SANDBOX_BIN = $(BUILD)/ib-sandbox

all: $(BUILD)/imagebuilder $(INIT_BINS) $(SANDBOX_BIN)

$(BUILD)/ib-init-%: init/ib-init.c init/agent.c init/ib-init.h builder/vm-proto.h builder/sandbox-dev.h lib/rtnl.c lib/rtnl.h lib/banned.h
	@mkdir -p $(dir $@)
	$(call init_cc,$*) $(INIT_CFLAGS) -I. -o $@ init/ib-init.c init/agent.c lib/rtnl.c

$(SANDBOX_BIN): init/ib-sandbox.c builder/sandbox-proto.h lib/banned.h
	@mkdir -p $(dir $@)
	$(CC) $(INIT_CFLAGS) -I. -o $@ $<

$(GEN)/.stamp: proto/$(PROTO) proto/grpc/health/v1/health.proto proto/grpc/reflection/v1/reflection.proto
	@mkdir -p $(GEN)/proto/grpc/reflection/v1alpha
	sed 's/^package grpc\.reflection\.v1;/package grpc.reflection.v1alpha;/' \
		proto/grpc/reflection/v1/reflection.proto > $(GEN)/proto/grpc/reflection/v1alpha/reflection.proto
	protoc-c --c_out=$(GEN) -I proto -I $(GEN)/proto -I /usr/include $(PROTO) $(PROTO_GRPC) $(PROTO_WKT)
	protoc-c --descriptor_set_out=$(GEN)/imagebuilder.desc --include_imports \
		-I proto -I $(GEN)/proto -I /usr/include $(PROTO) $(PROTO_GRPC)
	@touch $@
$(filter-out $(GEN)/descriptor-set.c,$(GEN_SRC)): $(GEN)/.stamp
# the descriptor set as bytes in the program
$(GEN)/descriptor-set.c: $(GEN)/.stamp
	{ echo '#include <stddef.h>'; echo 'const unsigned char ib_descriptor_set[] = {'; \
	  od -An -v -tx1 $(GEN)/imagebuilder.desc | sed 's/ *\([0-9a-f][0-9a-f]\)/0x\1,/g'; \
	  echo '};'; echo 'const size_t ib_descriptor_set_len = sizeof(ib_descriptor_set);'; } > $@

$(BUILD)/obj/gen/%.o: $(GEN)/%.c $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -Wno-missing-prototypes -c $< -o $@

$(BUILD)/obj/%.o: %.c $(FLAGS_STAMP) | $(GEN)/.stamp
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libimagebuilder.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/imagebuilder: $(CLI_OBJ) $(BUILD)/libimagebuilder.a
	$(CC) $(LDFLAGS) -o $@ $(CLI_OBJ) $(BUILD)/libimagebuilder.a $(LIBS)

$(BUILD)/tests/%: tests/unit/%.c tests/unit/test.h $(BUILD)/libimagebuilder.a $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libimagebuilder.a $(LIBS)

deps:
	@scripts/install-deps.sh

unit: $(UNIT_BIN)

test: deps
	@$(MAKE) --no-print-directory all unit
	@tests/run.sh $(BUILD)

demo: deps
	@$(MAKE) --no-print-directory all
	@scripts/demo.sh $(BUILD)

unit-test: deps
	@$(MAKE) --no-print-directory unit
	@TESTS='test-*' tests/run.sh $(BUILD)

# Folders include only folders below them, no include cycles; every
# multi-step change of the cache has its crash points; the analyzer finds
# nothing new; everything compiles without a warning.
check: $(GEN)/.stamp
	@scripts/check-layers.py
	@scripts/check-crash-points.py
	@IB_GEN=$(GEN) scripts/analyze.sh
	@$(MAKE) --no-print-directory BUILD=$(BUILD)-werror WERROR=1 all unit >/dev/null
	@echo "check: builds with -Werror"

analyze: $(GEN)/.stamp
	@IB_GEN=$(GEN) scripts/analyze.sh

fresh-check:
	@scripts/fresh-check.sh

# BENCH=run|sandbox|arm64|serve-bench|remote|vm picks one; all by default.
BENCH ?= run sandbox arm64 serve-bench remote vm
bench: deps
	@$(MAKE) --no-print-directory all
	@for b in $(BENCH); do echo "== bench/$$b.sh"; bench/$$b.sh $(BUILD) || exit 1; done

clean:
	rm -rf $(BUILD) $(BUILD)-werror

.PHONY: all deps unit unit-test test check analyze fresh-check demo bench clean

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d)
