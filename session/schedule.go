package session

import (
	"context"
	"errors"
	"runtime"
	"time"
)

// Run scans the guest's processes and modules on policy's schedule
// until ctx ends, keeping the latest result (Latest) and judging each
// complete scan by the rule base (LastReport; new findings become
// events). One scan at a time, on this goroutine, locked to its thread
// so that the scan's CPU time is the thread's: each scan is bounded by
// the policy's budget and stopped when it reaches it (reported as
// partial: metrics result "partial", its results unused), and the wait
// after it follows the interval with its jitter, the duty cycle and the
// back-off (ScanPolicy). Errors go to logf and the scan is retried on
// the next tick. With SetEvents, what changed between two scans
// (processes started and gone, modules loaded and unloaded) becomes
// events; a scan of a damaged list reports no process as gone (what it
// did not reach is not gone).
func (s *Session) Run(ctx context.Context, p ScanPolicy, logf func(err error)) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	sched := &scheduler{p: p, load: hostLoad}
	var ch changes
	for {
		ev := s.eventSink()
		b := &budget{maxBytes: p.MaxBytes, maxCPU: p.MaxCPU}
		sctx, cancel := context.WithTimeout(context.WithValue(ctx, budgetKey{}, b), p.Interval)
		cpu0 := threadCPU()
		l, err := s.look(sctx)
		if err == nil && l.modErr != nil {
			err = l.modErr
		}
		if err == nil {
			if ev != nil {
				if !l.scan.Partial {
					ch.sawProcesses(ev, l.scan.Processes)
				}
				if l.modDamage == nil {
					ch.sawModules(ev, l.mods)
				}
			}
			// The judgement's own reads (integrity, cross-views) are
			// the scan's too.
			s.judgeSeen(sctx, l.scan.Processes, l.mods, l.warnings(), true)
			if b.hit != "" {
				err = ErrBudget
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
