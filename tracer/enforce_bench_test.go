//go:build linux && amd64

package tracer

import (
	"fmt"
	"strings"
	"testing"
)

// BenchmarkTrappedIoctl is the cost a policy adds to one ioctl, on the path
// QEMU's calls take: a real traced process (testdata/ioctls.c) makes the
// call in a loop under the seccomp filter and the tracer, as QEMU does
// under kvmscope run. ns/op is per call, wall time in the traced process's
// loop. Rows:
//   - filter-allowed: a request the filter lets through (no stop), the
//     baseline;
//   - decided-value: a stop in the tracer, decided on the argument's value
//     (KVM_CREATE_VCPU vcpu_id), no memory read;
//   - decided-pointer: decided on a field read through the pointer
//     (KVM_SET_MSRS index), which freezes the process and follows the call
//     to its exit; with 0 and 8 other (idle) threads to freeze.
func BenchmarkTrappedIoctl(b *testing.B) {
	p := mustParse(b, fmt.Sprintf(testPolicy, "enforce"))
	for _, tc := range []struct {
		name, call string
		threads    int
	}{
		{"filter-allowed", "tcgets", 0},
		{"decided-value", "vcpu1", 0},
		{"decided-pointer", "msrs-other", 0},
		{"decided-pointer-8-threads", "msrs-other", 8},
	} {
		b.Run(tc.name, func(b *testing.B) {
			args := []string{fmt.Sprintf("threads:%d", tc.threads), fmt.Sprintf("repeat:%d:%s", b.N, tc.call)}
			tr, sc := startTraced(b, p, nil, args...)
			b.StopTimer()
			if !sc.Scan() || sc.Text() != "start" {
				b.Fatalf("no start line: %q", sc.Text())
			}
			b.StartTimer()
			if !sc.Scan() {
				b.Fatal("the program ended early")
			}
			b.StopTimer()
			if !strings.HasSuffix(sc.Text(), fmt.Sprintf(" %d", enotty)) {
				b.Fatalf("%s: %q, want ENOTTY (allowed through to /dev/null)", tc.call, sc.Text())
			}
			for sc.Scan() {
			}
			<-tr.Done()
			b.ReportMetric(float64(tr.freezes)/float64(b.N), "freezes/op")
		})
	}
}
