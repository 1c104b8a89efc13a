package introspect

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
)

// Scanner introspects one VM over time. It discovers the kernel and its
// offsets once and keeps them, so later scans only walk the task list
// (CloudVMI's "millisecond response" requirement). Scans run on the
// caller's goroutine (on demand) or on the Scanner's own goroutine (Run),
// never on the tracer's ptrace thread.
type Scanner struct {
	src guestmem.Source
	// Pause, when set, freezes the guest for a consistent scan and returns
	// the function that resumes it.
	Pause func(ctx context.Context) (resume func(), err error)
	// OnScan, when set, is called after every scan (for metrics).
	OnScan func(d time.Duration, err error)

	mu      sync.Mutex // serializes discovery and scans
	kernel  *Kernel
	offsets *Offsets
	offErr  error // what FindOffsets could not find (offsets may still be usable)

	latestMu sync.Mutex
	latest   *Scan
}

// Scan is the result of one process scan.
type Scan struct {
	At        time.Time     `json:"at"`
	Duration  time.Duration `json:"duration_ns"`
	Processes []Process     `json:"processes"`
	// Consistent is set when the guest was paused during the scan.
	Consistent bool `json:"consistent"`
}

// NewScanner returns a scanner of src.
func NewScanner(src guestmem.Source) *Scanner { return &Scanner{src: src} }

// Kernel returns the discovered kernel and offsets, discovering them on
// first use. A failed discovery is retried on the next call (the guest may
// still be booting).
func (s *Scanner) Kernel(ctx context.Context) (*Kernel, *Offsets, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.discover(ctx)
}

// discover. Precondition: s.mu held.
func (s *Scanner) discover(ctx context.Context) (*Kernel, *Offsets, error) {
	if s.kernel != nil {
		return s.kernel, s.offsets, nil
	}
	// Registers are a cross-check only; discovery works without them.
	cpus, _ := s.src.CPUs(ctx)
	k, err := Discover(s.src, DiscoverOptions{CPUs: cpus})
	if err != nil {
		return nil, nil, fmt.Errorf("find the guest kernel: %w", err)
	}
	off, err := FindOffsets(k)
	if off == nil {
		return nil, nil, fmt.Errorf("find structure offsets: %w", err)
	}
	s.kernel, s.offsets, s.offErr = k, off, err
	return k, off, nil
}

// OffsetsError reports the members FindOffsets could not find, if any.
func (s *Scanner) OffsetsError() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.offErr
}

// Forget drops what was discovered (after a guest reboot, say).
func (s *Scanner) Forget() {
	s.mu.Lock()
	s.kernel, s.offsets, s.offErr = nil, nil, nil
	s.mu.Unlock()
}

// Processes scans the guest's processes now.
func (s *Scanner) Processes(ctx context.Context, opts ProcessOptions, consistent bool) (*Scan, error) {
	start := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	k, off, err := s.discover(ctx)
	if err != nil {
		s.report(start, err)
		return nil, err
	}
	if consistent {
		if s.Pause == nil {
			return nil, errors.New("this VM cannot be paused for a consistent scan")
		}
		resume, err := s.Pause(ctx)
		if err != nil {
			return nil, fmt.Errorf("pause the VM: %w", err)
		}
		defer resume()
	}
	procs, err := scanView(k).Processes(off, opts)
	if err != nil {
		// What was discovered may be stale (the guest rebooted into
		// another kernel or KASLR slide): discover again, once.
		s.kernel = nil
		if k, off, err = s.discover(ctx); err == nil {
			procs, err = scanView(k).Processes(off, opts)
		}
	}
	if err != nil {
		s.report(start, err)
		return nil, err
	}
	scan := &Scan{At: start, Duration: time.Since(start), Processes: procs, Consistent: consistent}
	if !opts.Threads {
		s.latestMu.Lock()
		s.latest = scan
		s.latestMu.Unlock()
	}
	s.report(start, nil)
	return scan, nil
}

func (s *Scanner) report(start time.Time, err error) {
	if s.OnScan != nil {
		s.OnScan(time.Since(start), err)
	}
}

// Modules lists the guest's kernel modules now.
func (s *Scanner) Modules(ctx context.Context) ([]Module, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, off, err := s.discover(ctx)
	if err != nil {
		return nil, err
	}
	return scanView(k).Modules(off)
}

// scanBlock and scanCacheMax size the per-scan block cache: 64 KiB holds an
// order-3 task_struct slab and then some; 256 MiB bounds a scan's memory.
const (
	scanBlock    = 64 << 10
	scanCacheMax = 256 << 20
)

// scanView is k reading guest memory through a block cache made for one
// scan, with its own page-table walker: translations and memory are cached
// within the scan and never across scans. A walk of thousands of tasks
// then costs a system call per 64 KiB block of slab instead of one per
// task, cred and mm read.
func scanView(k *Kernel) *Kernel {
	c := guestmem.NewBlockCache(k.Mem, scanBlock, scanCacheMax)
	kc := *k
	kc.Mem = c
	kc.userMem = k.Mem
	kc.AS = guestmem.NewAddressSpace(c, k.AS.Root(), k.AS.Levels())
	return &kc
}

// Latest returns the newest process scan, or nil.
func (s *Scanner) Latest() *Scan {
	s.latestMu.Lock()
	defer s.latestMu.Unlock()
	return s.latest
}

// Run scans every interval until ctx ends, keeping the latest result. The
// scan policy is deliberately simple: one scan at a time, never more often
// than the interval, so scanning cannot compete with the guest for more
// than one core's slice. Errors are passed to logf and retried.
func (s *Scanner) Run(ctx context.Context, interval time.Duration, logf func(err error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		sctx, cancel := context.WithTimeout(ctx, interval)
		_, err := s.Processes(sctx, ProcessOptions{}, false)
		cancel()
		if err != nil && logf != nil && ctx.Err() == nil {
			logf(err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
