# HyperSEV: every entry point a person or CI uses. `make demo` and
# `make test` each work alone on a fresh machine: both install what is
# missing first (`make deps`, idempotent and quick when nothing is).

CARGO ?= cargo
export PATH := $(CURDIR)/.tools/cargo/bin:$(PATH)
# The real AMD evidence the tests and the demo read (kept in the repository).
export HSEV_TESTDATA ?= $(CURDIR)/attestation/testdata/snp
FUZZ_SECONDS ?= 30
IMAGE_OUT ?= $(CURDIR)/images/out

.PHONY: deps build agent firmware prepare test lint unit-tests fuzz-smoke demo bench image clean

deps:
	@bash scripts/deps.sh

build: deps
	$(CARGO) build --workspace --bins

# The guest agent the image carries: a release build (the initramfs takes a
# stripped copy).
agent: deps
	$(CARGO) build --release -p hsev-agent

# The guest's SEV firmware, built from edk2's source once and then cached.
firmware: deps
	@bash images/firmware.sh $(IMAGE_OUT)/firmware/OVMF.fd

# What the image needs, side by side: the debug binaries, the release agent
# and the firmware do not depend on one another, and a first run spends most
# of its time on them (about 75, 55 and 90 s of a 2-core machine).
prepare: deps
	@$(MAKE) --no-print-directory -j3 build agent firmware

# The guest image, with the agent that unlocks the encrypted data disk.
image: prepare
	@HSEV_AGENT=$(CURDIR)/target/release/hsev-agent IMAGE_OUT=$(IMAGE_OUT) bash images/build.sh

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit-tests: image
	$(CARGO) test --workspace

test: lint unit-tests fuzz-smoke

fuzz-smoke: deps
	@bash scripts/fuzz-smoke.sh $(FUZZ_SECONDS)

demo:
	@bash scripts/plan.sh demo
	@$(MAKE) --no-print-directory image
	@bash scripts/demo.sh

bench: image
	@bash scripts/bench.sh

clean:
	$(CARGO) clean
	rm -rf images/out
