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
