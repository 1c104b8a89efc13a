package launch

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kvmscope/kvmscope/internal/eventlog"
	"github.com/kvmscope/kvmscope/tracer"
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

// tracerOptions sets up what the tracer enforces and reports, and the
// VM's logs.
func tracerOptions(o Options, dir, name string) (tracer.Options, *vmLogs, error) {
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
	if o.NoAPI && topts.Policy == nil {
		return topts, logs, nil
	}
	sock := o.Socket
	if sock == "" {
		if err := prepareDir(dir, o.Groups); err != nil {
			return topts, nil, fmt.Errorf("event log: %w", err)
		}
		sock = SocketPath(dir, name)
	}
	var err error
	if logs.events, err = eventlog.Open(EventsPath(sock), 0o640); err != nil {
		return topts, nil, fmt.Errorf("event log: %w", err)
	}
	topts.Events = logs.events
	if !o.NoAPI {
		if logs.blocked, err = eventlog.Open(BlockedPath(sock), 0o640); err != nil {
			logs.Close()
			return topts, nil, fmt.Errorf("blocked-write log: %w", err)
		}
		logs.queue = newBlockedQueue()
		topts.Blocked = logs.queue.push
	}
	return topts, logs, nil
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
