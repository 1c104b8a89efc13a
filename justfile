# kvmscope tasks. `just --list` shows them.
set shell := ["bash", "-euo", "pipefail", "-c"]

export GOFLAGS := "-buildvcs=false"

default:
    @just --list

# Install QEMU, busybox and friends (apt-get), then fetch the test guest kernels.
setup:
    scripts/setup.sh
    just guests

# Download the guest kernels (Debian 6.1 cloud, gokrazy 7.1) and build the busybox initramfs.
guests:
    scripts/fetch-guests.sh

# Build the binaries into bin/.
build:
    go build -o bin/kvmscope ./cmd/kvmscope
    go build -o bin/kvmscope-qemu ./cmd/kvmscope-qemu

# The demo: boot a real Linux guest under kvmscope and look inside it from outside.
demo: setup build
    scripts/demo.sh

# Run every test against real QEMU and real guest kernels (and libvirt, as root).
test: setup
    scripts/setup-libvirt.sh
    go vet ./...
    test -z "$(gofmt -l $(git ls-files '*.go'))" || { gofmt -l $(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
    for f in scripts/*.sh scripts/initramfs/init .ci/run; do bash -n "$f" || exit 1; done
    scripts/test.sh

# Run KVM tests in the nested-KVM lab even where /dev/kvm works (docs/testing.md): just lab ./cmd/kvmscope '^TestKVMCapture$'
lab pkg="./..." run=".": setup
    scripts/lab.sh {{pkg}} '{{run}}'

# libvirt integration tests (root: installs and starts libvirtd; test-only domains).
libvirt:
    scripts/setup-libvirt.sh --start
    go test -count=1 -v -run 'Libvirt' ./cmd/kvmscope-qemu

# Benchmarks, printed as a table of ratios measured in the same run.
bench: setup build
    scripts/bench.sh

# Run each fuzz target for a short while (FUZZTIME, default 20s).
fuzz fuzztime="20s":
    scripts/fuzz.sh {{fuzztime}}

# gofmt, go vet and staticcheck.
lint:
    test -z "$(gofmt -l $(git ls-files '*.go'))"
    go vet ./...
    go run honnef.co/go/tools/cmd/staticcheck@latest ./...
