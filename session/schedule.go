package session

import (
	"context"
	"time"

	"github.com/kvmscope/kvmscope/introspect"
)

// Run scans the guest's processes every interval until ctx ends, keeping
// the latest result (Latest). The policy is deliberately simple: one scan
// at a time, never more often than the interval, so scanning cannot
// compete with the guest for more than one core's slice. Errors go to
// logf and the scan is retried on the next tick. With ev, what changed
// between two scans (processes started and gone, modules loaded and
// unloaded) becomes events.
func (s *Session) Run(ctx context.Context, interval time.Duration, ev Events, logf func(err error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	var ch changes
	for {
		sctx, cancel := context.WithTimeout(ctx, interval)
		scan, err := s.Processes(sctx, introspect.ProcessOptions{}, false)
		if err == nil && ev != nil {
			ch.sawProcesses(ev, scan.Processes)
			var ms []introspect.Module
			if ms, err = s.Modules(sctx); err == nil {
				ch.sawModules(ev, ms)
			}
		}
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
