package policy

import (
	"fmt"
	"strings"
	"syscall"

	"github.com/kvmscope/kvmscope/tracer/ioctl"
)

// Call is one trapped ioctl as the tracer sees it at syscall entry.
type Call struct {
	Cmd    uint32
	Arg    uint64
	Thread Thread // ThreadMain, ThreadVCPU or ThreadIO
	// FD resolves the fd: its /proc/PID/fd link ("/dev/kvm",
	// "anon_inode:kvm-vm", ...). Called only when a rule names an fd.
	FD func() (string, error)
	// Args decodes the argument, reading QEMU's memory for pointer
	// arguments. Called only when a rule tests a field; the tracer caches
	// the result for its own bookkeeping.
	Args func() (*ioctl.Args, error)
}

// Decision is the outcome for one call.
type Decision struct {
	// Action is what the tracer does: Allow, Deny or Kill. Log and
	// unenforced decisions perform the call (Action Allow) and are events.
	Action Action
	Errno  syscall.Errno // for Deny
	// Verdict is what the policy said (the matched rule's action, or the
	// default); it differs from Action in log mode and after an error.
	Verdict Action
	Rule    *Rule // nil: the default, or no decision (Err)
	// Err is why the call could not be decided (it was then denied in
	// enforce mode, allowed in log mode).
	Err error
}

// Event reports whether the decision is one kvmscope records: everything
// but a plain allow.
func (d Decision) Event() bool { return d.Verdict != Allow || d.Err != nil }

// Enforced reports whether the policy's verdict was carried out.
func (d Decision) Enforced() bool { return d.Err == nil && d.Action == actionOf(d.Verdict) }

func actionOf(a Action) Action {
	if a == Log {
		return Allow
	}
	return a
}

// Decide walks the rules in order; the first that matches decides, else
// the default does.
func (p *Policy) Decide(c *Call) Decision {
	verdict, errno, rule, err := p.match(c)
	d := Decision{Verdict: verdict, Errno: errno, Rule: rule, Err: err}
	switch {
	case err != nil && p.Mode == Enforce:
		d.Action, d.Errno = Deny, DefaultErrno // fail closed
	case err != nil:
		d.Action, d.Errno = Allow, 0 // fail open, and the event says so
	case p.Mode == LogOnly:
		d.Action = Allow
	default:
		d.Action = actionOf(verdict)
	}
	return d
}

func (p *Policy) match(c *Call) (Action, syscall.Errno, *Rule, error) {
	var link string
	var fdErr error
	fdDone := false
	for _, r := range p.Rules {
		if !r.appliesTo(c.Cmd) {
			continue
		}
		if r.Thread != "" && r.Thread != ThreadAny && r.Thread != c.Thread {
			continue
		}
		if r.FD != "" {
			if !fdDone {
				link, fdErr = c.FD()
				fdDone = true
			}
			if fdErr != nil {
				return "", 0, r, fmt.Errorf("rule %s: resolve the fd: %w", r.Label(), fdErr)
			}
			if !fdMatches(r.FD, link) {
				continue
			}
		}
		ok, err := r.matchFields(c)
		if err != nil {
			return "", 0, r, fmt.Errorf("rule %s: %w", r.Label(), err)
		}
		if ok {
			return r.Action, r.Errno, r, nil
		}
	}
	errno := syscall.Errno(0)
	if p.Default == Deny {
		errno = DefaultErrno
	}
	return p.Default, errno, nil, nil
}

func (r *Rule) matchFields(c *Call) (bool, error) {
	if len(r.Match) == 0 {
		return true, nil
	}
	args, err := c.Args()
	if err != nil {
		return false, err
	}
	for _, cond := range r.Match {
		vals, ok := args.Get(cond.Field)
		if !ok {
			// The request has the field but this call did not carry it
			// (never for the catalogue's decoders): no match.
			return false, nil
		}
		if !cond.holds(vals) {
			return false, nil
		}
	}
	return true, nil
}

// ClassifyFD gives the kind of fd a /proc/PID/fd link names.
func ClassifyFD(link string) ioctl.FD {
	switch {
	case link == "/dev/kvm":
		return ioctl.FDKVM
	case link == "anon_inode:kvm-vm":
		return ioctl.FDVM
	case strings.HasPrefix(link, "anon_inode:kvm-vcpu:"):
		return ioctl.FDVCPU
	case strings.HasPrefix(link, "anon_inode:kvm-"):
		return ioctl.FDDevice
	}
	return ioctl.FDAny
}

func fdMatches(want, link string) bool {
	if strings.HasPrefix(want, "/") {
		return link == want
	}
	return string(ClassifyFD(link)) == want
}
