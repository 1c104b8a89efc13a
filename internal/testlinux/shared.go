package testlinux

import (
	"context"
	"sync"
	"testing"
)

// Shared boots one guest on first use and shares it among a package's
// tests (booting under TCG takes seconds). Close it from TestMain after
// m.Run:
//
//	var debian = &testlinux.Shared{Kernel: testlinux.Debian}
//	func TestMain(m *testing.M) { code := m.Run(); debian.Close(); os.Exit(code) }
type Shared struct {
	// Kernel picks the kernel from Paths.
	Kernel func(Paths) string
	// Options are the boot options; Kernel is filled in from the field
	// above.
	Options Options

	once sync.Once
	g    *Guest
	err  error
}

// Debian and Gokrazy pick a kernel for Shared.
func Debian(p Paths) string  { return p.DebianKernel }
func Gokrazy(p Paths) string { return p.GokrazyKernel }

// Get returns the booted guest, skipping the test when the guests are not
// fetched and failing it when the boot failed.
func (s *Shared) Get(t testing.TB) *Guest {
	t.Helper()
	p := Require(t)
	s.once.Do(func() {
		opts := s.Options
		opts.Kernel = s.Kernel(p)
		s.g, s.err = Boot(context.Background(), opts)
		if s.err == nil {
			t.Logf("booted %s (%s) in %v", opts.Kernel, s.g.Release(), s.g.BootTime())
		}
	})
	if s.err != nil {
		t.Fatalf("boot test guest: %v", s.err)
	}
	return s.g
}

// Close stops the guest if it was booted.
func (s *Shared) Close() {
	if s.g != nil {
		s.g.Close()
	}
}
