package policy

import "sort"

// Plan says which ioctl requests must stop in the tracer for the policy
// to decide them. Every other request is allowed by the seccomp filter
// itself, without a stop.
type Plan struct {
	// TrapAll: every request stops except those in Allow. Otherwise only
	// those in Trap stop.
	TrapAll bool
	Allow   []uint32
	Trap    []uint32
}

// Plan works out, for each request, which actions the rules can reach.
// A request whose only reachable action is allow needs no stop. Requests
// no rule names share the outcome of the rules for every request and the
// default.
func (p *Policy) Plan() Plan {
	named := map[uint32]bool{}
	for _, r := range p.Rules {
		for _, c := range r.Requests {
			named[c] = true
		}
	}
	cmds := make([]uint32, 0, len(named))
	for c := range named {
		cmds = append(cmds, c)
	}
	sort.Slice(cmds, func(i, j int) bool { return cmds[i] < cmds[j] })

	var pl Plan
	pl.TrapAll = !p.onlyAllow(func(r *Rule) bool { return r.Requests == nil })
	for _, c := range cmds {
		allow := p.onlyAllow(func(r *Rule) bool { return r.appliesTo(c) })
		switch {
		case pl.TrapAll && allow:
			pl.Allow = append(pl.Allow, c)
		case !pl.TrapAll && !allow:
			pl.Trap = append(pl.Trap, c)
		}
	}
	return pl
}

// onlyAllow reports whether every action reachable through the rules that
// apply (in order, stopping at the first unconditional one, else reaching
// the default) is allow. In log mode deny and kill are still events, so
// they still need the stop.
func (p *Policy) onlyAllow(applies func(*Rule) bool) bool {
	for _, r := range p.Rules {
		if !applies(r) {
			continue
		}
		if r.Action != Allow {
			return false
		}
		if r.unconditional() {
			return true
		}
	}
	return p.Default == Allow
}
