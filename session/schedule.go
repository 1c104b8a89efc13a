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
// logf and the scan is retried on the next tick.
func (s *Session) Run(ctx context.Context, interval time.Duration, logf func(err error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		sctx, cancel := context.WithTimeout(ctx, interval)
		_, err := s.Processes(sctx, introspect.ProcessOptions{}, false)
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
