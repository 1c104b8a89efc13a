package main

import (
	"context"
	"syscall"
	"testing"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/introspect"
	"github.com/kvmscope/kvmscope/session"
)

func BenchmarkZZProf(b *testing.B) {
	sg := bootScanGuest(b, 3, 512, true)
	src := guestmem.NewTCG(sg.qmp, func() int { return sg.qemu }, false)
	s := session.New(session.Frozen{Src: src}, nil)
	ctx := context.Background()
	if _, err := s.Processes(ctx, introspect.ProcessOptions{}, false); err != nil {
		b.Fatal(err)
	}
	var r0, r1 syscall.Rusage
	syscall.Getrusage(0, &r0)
	n := 0
	for b.Loop() {
		n++
		if _, err := s.Processes(ctx, introspect.ProcessOptions{}, false); err != nil {
			b.Fatal(err)
		}
	}
	syscall.Getrusage(0, &r1)
	b.Logf("minflt/scan %d", (r1.Minflt-r0.Minflt)/int64(n))
}
