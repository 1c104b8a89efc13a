package policy

import (
	"fmt"
	"syscall"

	"github.com/kvmscope/kvmscope/tracer/ioctl"
)

// Action is what a rule does with a call.
type Action string

const (
	Allow Action = "allow" // perform it
	Deny  Action = "deny"  // fail it with the rule's errno; the kernel never sees it
	Log   Action = "log"   // perform it and record an event
	Kill  Action = "kill"  // kill QEMU
)

func parseAction(s string) (Action, error) {
	switch a := Action(s); a {
	case Allow, Deny, Log, Kill:
		return a, nil
	}
	return "", fmt.Errorf("unknown action %q (want allow, deny, log or kill)", s)
}

// Mode says whether deny and kill are carried out.
type Mode string

const (
	// Enforce carries out every action; a call that cannot be decided
	// (an unreadable argument, say) is denied: the policy fails closed.
	Enforce Mode = "enforce"
	// Audit performs every call and records what enforcing would have
	// done; a call that cannot be decided is allowed and the event says
	// so: the policy fails open.
	LogOnly Mode = "log"
)

// DefaultErrno is the errno of a deny rule without errno:, and of a call
// denied because it could not be decided.
const DefaultErrno = syscall.EPERM

// Policy is a checked policy file.
type Policy struct {
	Default Action
	Mode    Mode
	Rules   []*Rule
	// Source names the file ("" for a policy built in memory), for
	// events and messages.
	Source string
}

// Thread kinds a rule can name.
type Thread string

const (
	ThreadAny  Thread = "any"
	ThreadMain Thread = "main"  // the thread-group leader (QEMU's main loop)
	ThreadVCPU Thread = "vcpu"  // a thread that created a vCPU (it runs KVM_RUN for it)
	ThreadIO   Thread = "other" // any other thread (I/O, RCU, workers)
)

// Rule is one entry of rules:.
type Rule struct {
	Name string
	// Requests are the ioctl requests the rule applies to; nil means
	// every request.
	Requests []uint32
	// FD is "" (any fd), a kind (kvm, vm, vcpu, device) or the path an fd
	// must resolve to (/dev/vhost-net).
	FD     string
	Thread Thread
	Match  []*Cond
	Action Action
	Errno  syscall.Errno
	// Line and Column locate the rule in its file.
	Line, Column int
}

// Label names the rule in events: its name, else its position.
func (r *Rule) Label() string {
	if r.Name != "" {
		return r.Name
	}
	return fmt.Sprintf("rule at line %d", r.Line)
}

// unconditional reports whether the rule matches every call of its
// requests: no fd, thread or field condition.
func (r *Rule) unconditional() bool {
	return r.FD == "" && (r.Thread == "" || r.Thread == ThreadAny) && len(r.Match) == 0
}

// appliesTo reports whether the rule names request cmd (or every request).
func (r *Rule) appliesTo(cmd uint32) bool {
	if r.Requests == nil {
		return true
	}
	for _, c := range r.Requests {
		if c == cmd {
			return true
		}
	}
	return false
}

// requests returns the catalogue entries the rule names (nil entries for
// numbers the catalogue does not know).
func (r *Rule) requests() []*ioctl.Request {
	out := make([]*ioctl.Request, len(r.Requests))
	for i, c := range r.Requests {
		out[i], _ = ioctl.ByCmd(c)
	}
	return out
}

// Summary is the one line `kvmscope policy check` prints for a good file.
func (p *Policy) Summary() string {
	n := map[Action]int{}
	for _, r := range p.Rules {
		n[r.Action]++
	}
	return fmt.Sprintf("%d rules (%d allow, %d log, %d deny, %d kill), default %s, mode %s",
		len(p.Rules), n[Allow], n[Log], n[Deny], n[Kill], p.Default, p.Mode)
}
