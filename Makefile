# HyperSEV: every entry point a person or CI uses. `make demo` and
# `make test` each work alone on a fresh machine: both install what is
# missing first (`make deps`, idempotent and quick when nothing is).

CARGO ?= cargo
export PATH := $(CURDIR)/.tools/cargo/bin:$(PATH)
# The real AMD evidence the tests and the demo read (kept in the repository).
export HSEV_TESTDATA ?= $(CURDIR)/attestation/testdata/snp
FUZZ_SECONDS ?= 30

.PHONY: deps build test lint unit-tests fuzz-smoke demo bench image clean

deps:
	@bash scripts/deps.sh

build: deps
	$(CARGO) build --workspace --bins

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit-tests: build image
	$(CARGO) test --workspace

test: lint unit-tests fuzz-smoke

fuzz-smoke: deps
	@bash scripts/fuzz-smoke.sh $(FUZZ_SECONDS)

demo: build image
	@bash scripts/demo.sh

bench: deps image
	@bash scripts/bench.sh

# The guest image, with the agent (a release build; the initramfs takes a
# stripped copy) that unlocks the encrypted data disk.
image: build
	$(CARGO) build --release -p hsev-agent
	@HSEV_AGENT=$(CURDIR)/target/release/hsev-agent bash images/build.sh

clean:
	$(CARGO) clean
	rm -rf images/out
