package launch

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"time"

	"github.com/kvmscope/kvmscope/internal/eventlog"
	"github.com/kvmscope/kvmscope/introspect"
	"github.com/kvmscope/kvmscope/session"
	"github.com/kvmscope/kvmscope/tracer"
	"github.com/rs/zerolog"
)

// BlockedPath is a VM's blocked-write log: next to its socket,
// NAME.blocked.jsonl.
func BlockedPath(socket string) string {
	return strings.TrimSuffix(socket, ".sock") + ".blocked.jsonl"
}

// blockedQueue carries the guard's reports from the tracer thread, which
// must not wait, to the goroutine that describes and logs them.
type blockedQueue struct {
	ch      chan tracer.BlockedWrite
	dropped atomic.Uint64
}

func newBlockedQueue() *blockedQueue { return &blockedQueue{ch: make(chan tracer.BlockedWrite, 4096)} }

// push is tracer.Options.Blocked: it never blocks; past 4096 waiting
// reports it counts them as dropped (the tracer's counter still has them).
func (q *blockedQueue) push(w tracer.BlockedWrite) {
	select {
	case q.ch <- w:
	default:
		q.dropped.Add(1)
	}
}

// record describes each blocked store in the guest's terms and appends it
// to the blocked-write log and, as kind "blocked_write", to the event log,
// until ctx ends.
func (q *blockedQueue) record(ctx context.Context, sess *session.Session, blocked, events *eventlog.Log, log zerolog.Logger) {
	for {
		select {
		case <-ctx.Done():
			return
		case w := <-q.ch:
			e := sess.DescribeBlocked(w)
			if _, err := blocked.Append("blocked_write", e); err != nil {
				log.Error().Err(err).Msg("blocked-write log")
			}
			if events != nil {
				events.Append("blocked_write", e)
			}
			l := log.Warn()
			msg := "guard: blocked a guest write"
			if e.Landed {
				l, msg = log.Info().Str("reason", e.Reason), "guard: let a write through"
			}
			l.Str("gpa", e.GPA).Str("target", e.Target).Str("rip", e.RIP).Str("rip_symbol", e.RIPSymbol).Str("bytes", e.Bytes).Msg(msg)
		}
	}
}

// Protect and GuardStatus make a launched VM a session.Guarder.
func (r *runTarget) Protect(ctx context.Context, ranges []tracer.GuardRange, opts tracer.GuardOptions) (tracer.GuardStatus, error) {
	return r.t.Protect(ctx, ranges, opts)
}

func (r *runTarget) GuardStatus() tracer.GuardStatus { return r.t.GuardStatus() }

// GuardEvent is the event of the guard arming (kind "guard").
type GuardEvent struct {
	Protected int                   `json:"protected_pages"`
	Targets   []session.GuardTarget `json:"targets"`
	Error     string                `json:"error,omitempty"`
}

// armGuard protects the guest's dispatch for run --guard once the guest
// has booted: its kernel is found and a process scan sees init (pid 1),
// so the kernel's boot-time text patching is over. The first integrity
// check takes the baseline before. Under TCG it says once that it can
// only detect and restore.
func armGuard(ctx context.Context, qemuDone <-chan struct{}, sess *session.Session, baseline string, events *eventlog.Log, log zerolog.Logger) {
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-qemuDone:
			return
		case <-tick.C:
		}
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		g, err := tryArm(sctx, sess, baseline)
		cancel()
		switch {
		case errors.Is(err, session.ErrNoGuard):
			log.Warn().Err(err).Msg("--guard")
			return
		case errors.Is(err, errNotBooted):
			continue
		case err != nil:
			log.Debug().Err(err).Msg("--guard: not yet")
			continue
		}
		ev := GuardEvent{Protected: 0, Targets: g.Targets}
		for _, r := range g.Protected {
			ev.Protected += int(r.Size / 4096)
		}
		if events != nil {
			events.Append("guard", ev)
		}
		log.Info().Int("pages", ev.Protected).Msg("guard: the guest's system-call dispatch is protected")
		return
	}
}

var errNotBooted = errors.New("the guest has not booted yet")

func tryArm(ctx context.Context, sess *session.Session, baseline string) (*session.Guard, error) {
	if _, err := sess.GuardStatus(); err != nil {
		return nil, err
	}
	scan, err := sess.Processes(ctx, introspect.ProcessOptions{}, false)
	if err != nil {
		return nil, errNotBooted
	}
	booted := false
	for _, p := range scan.Processes {
		booted = booted || p.PID == 1
	}
	if !booted {
		return nil, errNotBooted
	}
	if _, err := sess.Integrity(ctx, baseline); err != nil {
		return nil, err
	}
	return sess.GuardDispatch(ctx)
}
