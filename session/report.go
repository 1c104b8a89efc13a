package session

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kvmscope/kvmscope/introspect"
	"github.com/kvmscope/kvmscope/rules"
)

// Report is what kvmscope concluded about the guest: the findings of the
// rule base over every judgement so far, highest severity first, each
// with when it was first and last seen (a finding that persists is one
// entry).
type Report struct {
	At time.Time `json:"at"`
	// Rules is the rule file the guest was judged by, or "built-in".
	Rules string `json:"rules"`
	// Judged lists the kinds of finding this judgement covered (a
	// rule about something not read judges nothing: see Warnings).
	Judged   []string        `json:"judged"`
	Findings []rules.Tracked `json:"findings"`
	// Views are the cross-views that ran (or why not), with what each
	// saw.
	Views []introspect.ViewResult `json:"views,omitempty"`
	// Partial is set when something could not be read whole; Warnings
	// say what.
	Partial  bool     `json:"partial"`
	Warnings []string `json:"warnings,omitempty"`
}

// FindingEvent is the event (kind "finding") of a finding first seen, or
// seen again after a judgement without it. Finding is the finding's own
// kind (process, module, hidden_process, ...).
type FindingEvent struct {
	Rule     string         `json:"rule"`
	Severity rules.Severity `json:"severity"`
	Finding  string         `json:"finding"`
	Key      string         `json:"key"`
	Summary  string         `json:"summary"`
	Evidence rules.Evidence `json:"evidence"`
}

// judging is the session's rule base and what it remembers between
// judgements.
type judging struct {
	set      atomic.Pointer[rules.Set]
	events   atomic.Pointer[eventsBox]
	baseline atomic.Pointer[string]
	track    rules.Tracker
	last     atomic.Pointer[Report]

	mu   sync.Mutex           // serializes judgements (prev, full*)
	prev []introspect.Process // the processes of the judgement before
	// fullAt is when the last full integrity check ran; fullRegs its
	// deviations that a quick check does not look at (IDT, LSTAR,
	// control registers).
	fullAt   time.Time
	fullRegs []introspect.Deviation
	fullSeen map[string]bool // the deviations of the last full check
}

// fullIntegrityEvery is how often scheduled judgements make a full
// integrity check (the guest paused, the vCPUs kicked for their MSRs);
// the ones between are quick (integrity's quick).
const fullIntegrityEvery = time.Minute

// judgeIntegrity checks the dispatch: fully when !quick or a minute
// after the last full check, else quickly, with a quick check that finds
// anything confirmed by a full one (a read made while the kernel patches
// its own text can be torn). A quick check carries the register-side
// deviations of the last full one over. Precondition: judging.mu held.
func (s *Session) judgeIntegrity(ctx context.Context, quick bool) ([]introspect.Deviation, error) {
	base := ""
	if p := s.judging.baseline.Load(); p != nil {
		base = *p
	}
	j := &s.judging
	full := !quick || time.Since(j.fullAt) >= fullIntegrityEvery
	in, err := s.integrity(ctx, base, !full)
	if err == nil && !full && j.unconfirmed(in.Deviations) {
		full = true
		in, err = s.integrity(ctx, base, false)
	}
	if err != nil {
		return nil, err
	}
	devs := append([]introspect.Deviation{}, in.Deviations...)
	if full {
		j.fullAt, j.fullRegs, j.fullSeen = time.Now(), nil, map[string]bool{}
		for _, d := range in.Deviations {
			j.fullSeen[deviationKey(d)] = true
			if d.Kind == "idt" || d.Kind == "cpu" || d.Kind == "msr" {
				j.fullRegs = append(j.fullRegs, d)
			}
		}
		return devs, nil
	}
	return append(devs, j.fullRegs...), nil
}

// unconfirmed reports whether a quick check found a deviation the last
// full check did not (the kernel's own text patching, runtime_patch,
// needs no confirming: it is not tampering).
func (j *judging) unconfirmed(devs []introspect.Deviation) bool {
	for _, d := range devs {
		if d.Kind != "runtime_patch" && !j.fullSeen[deviationKey(d)] {
			return true
		}
	}
	return false
}

func deviationKey(d introspect.Deviation) string {
	return d.Kind + "\x00" + d.What + "\x00" + d.Current
}

type eventsBox struct{ Events }

// SetRules replaces the rule base the session judges by (nil: the
// built-in one). The next judgement uses it.
func (s *Session) SetRules(set *rules.Set) { s.judging.set.Store(set) }

// Rules returns the rule base in force.
func (s *Session) Rules() *rules.Set {
	if set := s.judging.set.Load(); set != nil {
		return set
	}
	set := rules.Builtin()
	s.judging.set.CompareAndSwap(nil, set)
	return s.judging.set.Load()
}

// SetEvents makes new findings events (kind "finding") in ev.
func (s *Session) SetEvents(ev Events) { s.judging.events.Store(&eventsBox{ev}) }

// SetBaseline is where judgements keep and read the dispatch baseline
// (see Integrity); "" judges the dispatch by the kernel's own rules only.
func (s *Session) SetBaseline(path string) { s.judging.baseline.Store(&path) }

// LastReport is the newest judgement's report, or nil.
func (s *Session) LastReport() *Report { return s.judging.last.Load() }

func (s *Session) eventSink() Events {
	if b := s.judging.events.Load(); b != nil {
		return b.Events
	}
	return nil
}

// Judge scans the guest now (processes, modules, and what the rules ask
// for beyond them) and judges it by the rule base.
func (s *Session) Judge(ctx context.Context) (*Report, error) {
	l, err := s.look(ctx)
	if err != nil {
		return nil, err
	}
	mods, warnings := l.mods, l.warnings()
	if l.modErr != nil {
		warnings = append(warnings, fmt.Sprintf("modules not judged: %v", l.modErr))
		mods = nil
	}
	return s.judgeSeen(ctx, l.scan.Processes, mods, warnings, false), nil
}

// seen is what one look at the guest read: its processes (of a damaged
// list, what was read before the damage) and its modules (modDamage: a
// damaged list, read up to the damage; modErr: not read).
type seen struct {
	scan      *Scan
	mods      []introspect.Module
	modDamage *introspect.PartialError
	modErr    error
}

// look scans the processes and then the modules, as a judgement does.
func (s *Session) look(ctx context.Context) (*seen, error) {
	scan, err := s.Processes(ctx, introspect.ProcessOptions{}, false)
	if err != nil {
		return nil, err
	}
	l := &seen{scan: scan}
	l.mods, l.modErr = s.Modules(ctx)
	if errors.As(l.modErr, &l.modDamage) {
		l.modErr = nil
	}
	return l, nil
}

// warnings are the damage the look met.
func (l *seen) warnings() []string {
	w := append([]string(nil), l.scan.Warnings...)
	if l.modDamage != nil {
		w = append(w, l.modDamage.Warnings...)
	}
	return w
}

// judgeSeen judges what a scan saw (procs and mods; nil when not read),
// adding the dispatch integrity check and the cross-views when the rules
// ask for them, records the findings, makes events of the new ones and
// returns the report. quick (scheduled scans) makes the integrity check
// a quick one between full ones (judgeIntegrity).
func (s *Session) judgeSeen(ctx context.Context, procs []introspect.Process, mods []introspect.Module, warnings []string, quick bool) *Report {
	s.judging.mu.Lock()
	defer s.judging.mu.Unlock()
	set := s.Rules()
	want := map[string]bool{}
	for i := range set.Rules {
		want[set.Rules[i].Matcher()] = true
	}
	sub := rules.Subject{Processes: procs, Modules: mods}
	if procs != nil && s.judging.prev != nil {
		sub.Previous = s.judging.prev
	}
	if want["integrity"] {
		if devs, err := s.judgeIntegrity(ctx, quick); err != nil {
			warnings = append(warnings, fmt.Sprintf("dispatch integrity not judged: %v", err))
		} else {
			sub.Deviations = devs
		}
	}
	var views []introspect.ViewResult
	if want["hidden"] {
		v, w := s.crossViews(ctx, &sub)
		views = v
		warnings = append(warnings, w...)
	}
	if b, ok := ctx.Value(budgetKey{}).(*budget); ok && b.hit != "" {
		// A scheduled scan out of budget: what it read is incomplete,
		// and judging it would retire findings it did not look for.
		return nil
	}
	now := time.Now()
	judged := sub.Judged()
	fresh := s.judging.track.ObservePartial(now, set.Evaluate(sub), judged)
	if ev := s.eventSink(); ev != nil {
		for _, f := range fresh {
			ev.Append("finding", FindingEvent{Rule: f.Rule, Severity: f.Severity, Finding: f.Kind, Key: f.Key, Summary: f.Summary, Evidence: f.Evidence})
		}
	}
	if procs != nil {
		s.judging.prev = procs
	}
	r := &Report{At: now, Rules: set.Source, Judged: judged, Findings: s.judging.track.All(), Views: views, Partial: len(warnings) > 0, Warnings: warnings}
	if r.Findings == nil {
		r.Findings = []rules.Tracked{}
	}
	if r.Judged == nil {
		r.Judged = []string{}
	}
	s.judging.last.Store(r)
	return r
}
