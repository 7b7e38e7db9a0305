.PHONY: build test bench fmt vet

build:
	go build -o bin/wsp ./cmd/wsp

test:
	go test -race -timeout 20m ./...

# Throughput/latency of wsp vs direct (wrk); DURATION=s RUNS=n to shorten.
bench:
	./bench/run.sh

fmt:
	gofmt -s -w .

vet:
	go vet ./...

# Every native fuzz target for FUZZTIME each (default 20s); crashers land in
# testdata/fuzz and then run as regression tests with `make test`.
FUZZTIME ?= 20s
FUZZ_TARGETS = \
	./internal/config:FuzzLoadServer ./internal/config:FuzzLoadClient \
	./internal/tunnel:FuzzParseHello ./internal/rules:FuzzRules \
	./internal/server:FuzzDestination ./internal/server:FuzzCredentials \
	./internal/httperr:FuzzWriteResponse ./internal/legacy:FuzzLegacyMessages
.PHONY: fuzz
fuzz:
	@for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$name ($$pkg) for $(FUZZTIME)"; \
		go test -run '^$$' -fuzz "^$$name$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 5s $$pkg || exit 1; \
	done

# Soak (issue 6): mixed traffic through a server and two clients, one behind
# a proxy injecting random network faults, for SOAK (default 2m; SOAK=30m for
# longer); prints requests, errors by cause and the goroutine/fd/memory
# trend, and fails on a mismatched response, a hang or a rising trend.
# `make test` runs a 10 s version of it.
SOAK ?= 2m
.PHONY: soak
soak:
	go test -race -count=1 -v -run '^TestSoak$$' -timeout 0 ./test/ -soak=$(SOAK)

# One server holding N idle client sessions (default 10000): connect time and
# server memory per session.
N ?= 10000
.PHONY: bench-clients
bench-clients:
	N=$(N) ./bench/clients.sh
