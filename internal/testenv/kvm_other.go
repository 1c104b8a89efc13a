//go:build !(linux && amd64)

package testenv

import "errors"

// The KVM checks (kvm_unsafe.go) drive x86-64 KVM through the tracer's
// linux/amd64 layouts; elsewhere the KVM needs are simply not met.
var errKVMArch = errors.New("the KVM checks are written for linux/amd64")

func kvmUsable() error { return errKVMArch }

func kvmFast() error { return errKVMArch }

func guestDebug() error { return errKVMArch }
