package session

import (
	"context"
	"errors"
	"runtime"
	"time"

	"github.com/kvmscope/kvmscope/introspect"
)

// Run scans the guest's processes (and modules) on policy's schedule
// until ctx ends, keeping the latest result (Latest). One scan at a time,
// on this goroutine, locked to its thread so that the scan's CPU time is
// the thread's: each scan is bounded by the policy's budget and stopped
// when it reaches it (reported as partial: metrics result "partial"), and
// the wait after it follows the interval with its jitter, the duty cycle
// and the back-off (ScanPolicy). Errors go to logf and the scan is
// retried on the next tick. With ev, what changed between two complete
// scans (processes started and gone, modules loaded and unloaded) becomes
// events; a partial scan changes nothing (what it did not reach is not
// gone).
func (s *Session) Run(ctx context.Context, p ScanPolicy, ev Events, logf func(err error)) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	sched := &scheduler{p: p, load: hostLoad}
	var ch changes
	for {
		b := &budget{maxBytes: p.MaxBytes, maxCPU: p.MaxCPU}
		timeout := p.Interval
		sctx, cancel := context.WithTimeout(context.WithValue(ctx, budgetKey{}, b), timeout)
		cpu0 := threadCPU()
		scan, err := s.Processes(sctx, introspect.ProcessOptions{}, false)
		if err == nil && ev != nil {
			ch.sawProcesses(ev, scan.Processes)
			var ms []introspect.Module
			if ms, err = s.Modules(sctx); err == nil {
				ch.sawModules(ev, ms)
			}
		}
		cancel()
		cpu := threadCPU() - cpu0
		s.metrics.scheduled(p, b, cpu)
		if errors.Is(err, ErrBudget) {
			err = &PartialScanError{Budget: b.hit}
		}
		if err != nil && logf != nil && ctx.Err() == nil {
			logf(err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(sched.next(cpu)):
		}
	}
}

// PartialScanError says a scheduled scan stopped at its budget.
type PartialScanError struct{ Budget string }

func (e *PartialScanError) Error() string {
	return "scheduled scan partial: it reached its " + e.Budget + " budget (its results were not used)"
}
