package launch

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kvmscope/kvmscope/internal/eventlog"
	"github.com/kvmscope/kvmscope/tracer"
	"github.com/kvmscope/kvmscope/tracer/handoff"
	"github.com/kvmscope/kvmscope/tracer/policy"
)

// EventsPath is the event log of a VM: next to its socket, NAME.events.jsonl.
func EventsPath(socket string) string {
	return strings.TrimSuffix(socket, ".sock") + ".events.jsonl"
}

// BaselinePath is where a VM's dispatch baseline is kept: next to its
// socket, NAME.dispatch-baseline.json.
func BaselinePath(socket string) string {
	return strings.TrimSuffix(socket, ".sock") + ".dispatch-baseline.json"
}

// vmLogs are a VM's logs next to its socket: the event log
// (NAME.events.jsonl: the policy's decisions and the tracer's other
// events) and the blocked-write log (NAME.blocked.jsonl), which the API
// serves; nil without an API.
type vmLogs struct {
	events, blocked *eventlog.Log
	queue           *blockedQueue
}

func (l *vmLogs) Close() {
	if l.events != nil {
		l.events.Close()
	}
	if l.blocked != nil {
		l.blocked.Close()
	}
}

// tracerOptions sets up what the tracer enforces and where it reports:
// with an API, to q, the keeper's queues, which the analysis process
// empties into the VM's logs (openVMLogs); without one, to the event log
// itself, when there is a policy to log.
func tracerOptions(o Options, dir, name string, q *handoff.Queues) (tracer.Options, *vmLogs, error) {
	topts := tracer.Options{Policy: o.Policy}
	if o.LearnTo != "" {
		// Learn in log mode: every request stops, none is refused.
		topts.Policy = &policy.Policy{Default: policy.Log, Mode: policy.LogOnly, Source: "learn"}
		topts.Learn = &policy.Learner{}
		topts.Learned = func(l *policy.Learner) {
			if err := writeLearned(o.LearnTo, l, o.Argv); err != nil {
				o.Log.Error().Err(err).Msg("policy learn")
			}
		}
	}
	logs := &vmLogs{}
	if q != nil {
		topts.Events, topts.Blocked = q, q.Blocked
		return topts, logs, nil
	}
	if o.NoAPI && topts.Policy == nil {
		return topts, logs, nil
	}
	sock, err := socketOf(o, dir, name)
	if err != nil {
		return topts, nil, fmt.Errorf("event log: %w", err)
	}
	if logs.events, err = eventlog.Open(EventsPath(sock), 0o640); err != nil {
		return topts, nil, fmt.Errorf("event log: %w", err)
	}
	topts.Events = logs.events
	return topts, logs, nil
}

// openVMLogs opens the event and blocked-write logs the API at sock serves.
func openVMLogs(sock string) (*vmLogs, error) {
	logs := &vmLogs{}
	var err error
	if logs.events, err = eventlog.Open(EventsPath(sock), 0o640); err != nil {
		return nil, fmt.Errorf("event log: %w", err)
	}
	if logs.blocked, err = eventlog.Open(BlockedPath(sock), 0o640); err != nil {
		logs.Close()
		return nil, fmt.Errorf("blocked-write log: %w", err)
	}
	logs.queue = newBlockedQueue()
	return logs, nil
}

// socketOf is the VM's API socket: --api, else DIR/NAME.sock (DIR made
// when missing).
func socketOf(o Options, dir, name string) (string, error) {
	if o.Socket != "" {
		return o.Socket, nil
	}
	if err := prepareDir(dir, o.Groups); err != nil {
		return "", err
	}
	return SocketPath(dir, name), nil
}

// writeLearned writes the learned policy to path through a temporary file
// in the same directory, so a reader never sees half a policy and an
// existing file is replaced only by a complete one.
func writeLearned(path string, l *policy.Learner, argv []string) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".kvmscope-policy-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	header := fmt.Sprintf("Learned by kvmscope policy learn on %s from:\n  %s\nIt allows exactly the ioctls this QEMU made; anything else is logged.\nCheck it with: kvmscope policy check FILE",
		time.Now().UTC().Format(time.RFC3339), strings.Join(argv, " "))
	tmp.Chmod(0o644)
	if err := l.Write(tmp, policy.Log, header); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	// The file must be a valid policy: check before it replaces anything.
	if _, err := policy.Load(tmp.Name()); err != nil {
		return fmt.Errorf("learned policy does not check (a kvmscope bug): %w", err)
	}
	return os.Rename(tmp.Name(), path)
}
