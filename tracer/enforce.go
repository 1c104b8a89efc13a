//go:build linux && amd64

package tracer

import (
	"fmt"

	"github.com/kvmscope/kvmscope/tracer/ioctl"
	"github.com/kvmscope/kvmscope/tracer/policy"
	"golang.org/x/sys/unix"
)

// Events receives what the tracer decides (internal/eventlog.Log is one).
type Events interface {
	Append(kind string, fields any) (uint64, error)
}

// IoctlEvent is the event of a policy decision other than a plain allow,
// kind "ioctl".
type IoctlEvent struct {
	// Action is what was done: allow, deny or kill.
	Action policy.Action `json:"action"`
	// Verdict is what the policy said: the rule's action or the default.
	Verdict  policy.Action `json:"verdict"`
	Enforced bool          `json:"enforced"`
	Mode     policy.Mode   `json:"mode"`
	Rule     string        `json:"rule,omitempty"`
	RuleLine int           `json:"rule_line,omitempty"`
	Ioctl    string        `json:"ioctl"`
	Cmd      string        `json:"cmd"`
	FD       int           `json:"fd"`
	FDLink   string        `json:"fd_link,omitempty"`
	Thread   policy.Thread `json:"thread"`
	PID      int           `json:"pid"`
	TID      int           `json:"tid"`
	Args     *ioctl.Args   `json:"args,omitempty"`
	Errno    string        `json:"errno,omitempty"`
	// Error says why the call could not be decided; the call was then
	// denied (mode enforce) or allowed (mode log).
	Error string `json:"error,omitempty"`
	// ArgsError says why the fields could not be shown (the decision
	// did not need them).
	ArgsError string `json:"args_error,omitempty"`
}

// ABIEvent is the event of a system call on the i386 or x32 ABI, which
// the tracer always fails (ENOSYS), kind "abi".
type ABIEvent struct {
	ABI string `json:"abi"`
	NR  uint64 `json:"nr"`
	PID int    `json:"pid"`
	TID int    `json:"tid"`
}

// enforcer is the policy as a handler.
type enforcer struct {
	p     *policy.Policy
	learn *policy.Learner
	// learned is called with learn each time it sees something new.
	learned func(*policy.Learner)
}

func (h *enforcer) enter(c *call) verdict {
	d := h.p.Decide(c.policyCall())
	if h.learn != nil {
		var args *ioctl.Args
		if policy.WantsArgs(c.cmd) {
			args, _ = c.decode()
		}
		link, _ := c.fdLink()
		if h.learn.Add(c.cmd, policy.ClassifyFD(link), args) && h.learned != nil {
			// Saved before QEMU goes on, so the file is complete when
			// QEMU exits (the caller waits for QEMU, not for the tracer).
			h.learned(h.learn)
		}
	}
	// Learning logs every call by design; the learned file is its record.
	if d.Event() && (h.learn == nil || d.Err != nil) {
		h.record(c, d)
	}
	switch d.Action {
	case policy.Deny:
		return verdict{deny: true, errno: d.Errno}
	case policy.Kill:
		return verdict{kill: fmt.Sprintf("%s: %s", d.Rule.Label(), c.name())}
	}
	return verdict{}
}

func (h *enforcer) exit(*call, int64, bool) {}

func (h *enforcer) record(c *call, d policy.Decision) {
	ev := IoctlEvent{
		Action: d.Action, Verdict: d.Verdict, Enforced: d.Enforced(), Mode: h.p.Mode,
		Ioctl: c.name(), Cmd: fmt.Sprintf("%#x", c.cmd), FD: c.fd, Thread: c.thread(),
		PID: c.pid, TID: c.tid, Args: c.args,
	}
	if d.Rule != nil {
		ev.Rule, ev.RuleLine = d.Rule.Label(), d.Rule.Line
	}
	if c.linked {
		ev.FDLink = c.link
	}
	if d.Action == policy.Deny {
		ev.Errno = unix.ErrnoName(d.Errno)
	}
	if d.Err != nil {
		ev.Error = d.Err.Error()
	}
	if ev.Args == nil && c.req != nil && len(c.req.Fields) > 0 {
		// An event shows the decoded fields even when no rule needed
		// them; this read freezes QEMU too, so it shows what the kernel
		// gets. (Plain allows, the hot path, never come here.)
		var err error
		if ev.Args, err = c.decode(); err != nil && ev.Error == "" {
			ev.ArgsError = err.Error()
		}
	}
	c.t.emit("ioctl", ev)
}

// emit appends an event to the event log, or logs it when there is none.
func (t *Tracer) emit(kind string, ev any) {
	if t.events == nil {
		t.log.Warn().Interface("event", ev).Str("kind", kind).Msg("event")
		return
	}
	if _, err := t.events.Append(kind, ev); err != nil {
		t.log.Error().Err(err).Msg("event log")
	}
}
