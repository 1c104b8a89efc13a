package session

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/introspect"
)

// Session is the analysis side of one VM (see the package comment). It is
// safe for concurrent use; scans run one at a time, on the caller's
// goroutine, never on the tracer's ptrace thread.
type Session struct {
	machine Machine
	metrics *Metrics

	mu sync.Mutex // serializes discovery and scans
	d  discovery

	latest  atomic.Pointer[Scan]
	guard   guardState // the dispatch guard (guard.go)
	judging judging    // the rule base and its findings (report.go)

	actionMu sync.Mutex // one action inside the guest at a time (action_kill.go)
	// Writes of memory or registers and actions inside the guest exclude
	// each other (actions.go, write.go): acting is set while an action
	// runs, writes counts the writes between their pause and resume.
	exclMu sync.Mutex
	acting bool
	writes int
}

// Scan is the result of one process scan.
type Scan struct {
	At        time.Time            `json:"at"`
	Duration  time.Duration        `json:"duration_ns"`
	Processes []introspect.Process `json:"processes"`
	// Consistent is set when the guest was paused during the scan.
	Consistent bool `json:"consistent"`
	// ReadBytes and Reads are the guest memory the scan read, and in how
	// many read calls.
	ReadBytes int64 `json:"read_bytes"`
	Reads     int64 `json:"reads"`
	// Partial is set when the tasks list was damaged (a smeared read,
	// a hostile guest, DKOM): Processes holds what was read up to the
	// break, and Warnings name the damage.
	Partial  bool     `json:"partial,omitempty"`
	Warnings []string `json:"warnings,omitempty"`
}

// New returns the session of the VM m holds, counting into metrics (new
// ones when nil).
func New(m Machine, metrics *Metrics) *Session {
	if metrics == nil {
		metrics = NewMetrics()
	}
	return &Session{machine: m, metrics: metrics}
}

// Metrics returns the session's metrics.
func (s *Session) Metrics() *Metrics { return s.metrics }

// Memory returns the guest's current source, metered, with the source's
// capabilities (batched reads, writes, in-place memfd reads). It is for a
// few reads (an API request): make one per request.
func (s *Session) Memory() (guestmem.Source, error) {
	src, err := s.machine.Source()
	if err != nil {
		return nil, err
	}
	return meter(src, &counts{m: s.metrics}), nil
}

// Capabilities are those of the source scans read, as they read it.
func (s *Session) Capabilities() (guestmem.Capabilities, error) {
	src, err := s.Memory()
	if err != nil {
		return guestmem.Capabilities{}, err
	}
	return guestmem.CapabilitiesOf(src), nil
}

// Pause freezes the guest (see Machine.Pause).
func (s *Session) Pause(ctx context.Context) (func(), error) { return s.machine.Pause(ctx) }

// Kernel returns the guest kernel and its offsets, found on first use and
// checked against guest memory on every later one, and the members the
// offsets lack (offErr; the offsets may still be usable).
func (s *Session) Kernel(ctx context.Context) (k *introspect.Kernel, off *introspect.Offsets, offErr error, err error) {
	_, err = s.scan(ctx, "kernel", false, func(kv *introspect.Kernel, o *introspect.Offsets) error {
		k, off, offErr = kv, o, s.d.offErr
		return nil
	})
	return k, off, offErr, err
}

// Processes scans the guest's processes now; consistent pauses the guest
// for the scan.
func (s *Session) Processes(ctx context.Context, opts introspect.ProcessOptions, consistent bool) (*Scan, error) {
	start := time.Now()
	var procs []introspect.Process
	var damage *introspect.PartialError
	c, err := s.scan(ctx, "processes", consistent, func(k *introspect.Kernel, off *introspect.Offsets) (err error) {
		procs, err = k.Processes(off, opts)
		// Damage is data: what was read before the break is kept.
		if errors.As(err, &damage) {
			err = nil
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	scan := &Scan{At: start, Duration: time.Since(start), Processes: procs, Consistent: consistent, ReadBytes: c.bytes.Load(), Reads: c.reads.Load()}
	if damage != nil {
		scan.Partial, scan.Warnings = true, damage.Warnings
	}
	if !opts.Threads {
		s.latest.Store(scan)
	}
	return scan, nil
}

// Modules lists the guest's kernel modules now. A damaged modules list
// gives the modules read before the break and an *introspect.PartialError
// naming the damage.
func (s *Session) Modules(ctx context.Context) ([]introspect.Module, error) {
	var ms []introspect.Module
	var damage *introspect.PartialError
	_, err := s.scan(ctx, "modules", false, func(k *introspect.Kernel, off *introspect.Offsets) (err error) {
		ms, err = k.Modules(off)
		if errors.As(err, &damage) {
			err = nil
		}
		return err
	})
	if err == nil && damage != nil {
		return ms, damage
	}
	return ms, err
}

// Latest returns the newest process scan of thread-group leaders, or nil.
func (s *Session) Latest() *Scan { return s.latest.Load() }

// scan runs f on the guest kernel read through the current source,
// metered for this scan alone, with the guest paused when consistent. A
// kernel found before is checked first; when the check or f fails on it,
// the kernel is found again, once (the guest may have rebooted into
// another kernel or KASLR slide).
func (s *Session) scan(ctx context.Context, kind string, consistent bool, f func(*introspect.Kernel, *introspect.Offsets) error) (*counts, error) {
	start := time.Now()
	c := &counts{m: s.metrics}
	err := s.scanLocked(ctx, c, consistent, f)
	if err == nil && c.b != nil && c.b.hit != "" {
		// The walk may have taken a refused read for a missing page
		// (a command line, a thread count) and carried on: what it
		// returns is incomplete, never an all clear.
		err = ErrBudget
	}
	s.metrics.scan(kind, time.Since(start), c, err)
	return c, err
}

func (s *Session) scanLocked(ctx context.Context, c *counts, consistent bool, f func(*introspect.Kernel, *introspect.Offsets) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	src, err := s.machine.Source()
	if err != nil {
		return err
	}
	mem := meter(src, c)
	cached := s.d.kernel != nil
	// Discovery, when needed, runs before the pause: it may take
	// hundreds of milliseconds, which the guest should not spend stopped.
	k, off, err := s.d.get(ctx, mem)
	if err != nil {
		return err
	}
	// A scheduled scan's budget counts from here: discovery is not the
	// scan's (it happens once per boot).
	if b, ok := ctx.Value(budgetKey{}).(*budget); ok {
		b.start()
		c.b = b
	}
	if consistent {
		resume, err := s.machine.Pause(ctx)
		if err != nil {
			return fmt.Errorf("pause the VM: %w", err)
		}
		defer resume()
	}
	err = k.Check(off)
	if err == nil {
		err = f(k, off)
	}
	if err != nil && cached && !errors.Is(err, context.Canceled) && !errors.Is(err, ErrBudget) {
		s.d.forget()
		if k, off, err = s.d.get(ctx, mem); err == nil {
			err = f(k, off)
		}
	}
	return err
}
