//go:build !(linux && amd64)

package kvmprobe

import "errors"

// ErrNoStop: see probe_unsafe.go.
var ErrNoStop = errors.New("this KVM does not stop vCPUs at guest-debug breakpoints")

// GuestDebug drives x86-64 KVM; elsewhere there is nothing to probe.
func GuestDebug() error { return errors.New("the KVM probes are written for linux/amd64") }
