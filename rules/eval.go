package rules

import (
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"unicode"

	"github.com/kvmscope/kvmscope/introspect"
)

// Subject is what one scan saw. A nil list was not read (or not checked)
// in this scan: the rules about it judge nothing.
type Subject struct {
	Processes []introspect.Process
	// Previous is the scan before (nil on the first): cred_change and
	// parent_change compare against it.
	Previous   []introspect.Process
	Modules    []introspect.Module
	Deviations []introspect.Deviation // nil when not checked
	// HiddenProcesses and HiddenModules come from the cross-views; nil
	// when they were not run.
	HiddenProcesses []Hidden
	HiddenModules   []Hidden
}

// Judged is the finding kinds sub lets the rules judge: process when it
// has processes, cred_change and parent_change when it also has a
// previous scan, module, integrity, hidden_process and hidden_module
// when those were read. Tracker.ObservePartial keeps the findings of
// the other kinds as they were.
func (sub Subject) Judged() []string {
	var k []string
	if sub.Processes != nil {
		k = append(k, KindProcess)
		if sub.Previous != nil {
			k = append(k, KindCredChange, KindParentChange)
		}
	}
	if sub.Modules != nil {
		k = append(k, KindModule)
	}
	if sub.Deviations != nil {
		k = append(k, KindIntegrity)
	}
	if sub.HiddenProcesses != nil {
		k = append(k, KindHiddenProcess)
	}
	if sub.HiddenModules != nil {
		k = append(k, KindHiddenModule)
	}
	return k
}

// Hidden is an object one view of the guest kernel shows and another
// does not (a process off the tasks list but in the pid hash, a module
// off the modules list but in kobjects, ...).
type Hidden struct {
	Name string
	PID  int    // processes; 0 for modules
	Addr uint64 // task_struct or struct module address
	// SeenBy and MissingFrom name the views.
	SeenBy, MissingFrom []string
}

// The kinds of finding.
const (
	KindProcess       = "process"
	KindCredChange    = "cred_change"
	KindParentChange  = "parent_change"
	KindModule        = "module"
	KindIntegrity     = "integrity"
	KindHiddenProcess = "hidden_process"
	KindHiddenModule  = "hidden_module"
)

// Finding is one object a rule matched.
type Finding struct {
	Rule     string   `json:"rule"`
	Severity Severity `json:"severity"`
	// Kind is process, cred_change, parent_change, module, integrity,
	// hidden_process or hidden_module.
	Kind string `json:"kind"`
	// Key is the finding's identity across scans: the rule and the
	// object (task address, pid and start time; module name and address;
	// deviation kind and location).
	Key string `json:"key"`
	// Summary is one line for a human (guest strings sanitised).
	Summary  string   `json:"summary"`
	Evidence Evidence `json:"evidence"`
}

// Evidence is what the finding is about; guest strings are as read.
type Evidence struct {
	PID         int      `json:"pid,omitempty"`
	Comm        string   `json:"comm,omitempty"`
	UID         *int     `json:"uid,omitempty"`
	Task        string   `json:"task,omitempty"` // hex
	Path        string   `json:"path,omitempty"` // argv[0]
	Module      string   `json:"module,omitempty"`
	Addr        string   `json:"addr,omitempty"` // hex
	What        string   `json:"what,omitempty"`
	SeenBy      []string `json:"seen_by,omitempty"`
	MissingFrom []string `json:"missing_from,omitempty"`
	Before      string   `json:"before,omitempty"`
	After       string   `json:"after,omitempty"`
}

// commLen is the most bytes of a comm (TASK_COMM_LEN less its NUL).
const commLen = 15

// taskID is a task's identity across scans: an exec keeps all three, a
// new task that reuses a pid or a freed task_struct does not.
type taskID struct {
	task  uint64
	pid   int
	start uint64
}

func idOf(p *introspect.Process) taskID { return taskID{p.Task, p.PID, p.StartTime} }

// Evaluate judges sub against the rules. The findings are sorted by
// severity (highest first), then rule order, then key; one per key.
func (s *Set) Evaluate(sub Subject) []Finding {
	if s == nil {
		return nil
	}
	e := evaluator{sub: sub, seen: map[string]bool{}}
	for i := range s.Rules {
		e.rule = &s.Rules[i]
		e.idx = i
		e.eval()
	}
	sort.SliceStable(e.out, func(i, j int) bool {
		a, b := e.out[i], e.out[j]
		if a.f.Severity != b.f.Severity {
			return a.f.Severity > b.f.Severity
		}
		if a.idx != b.idx {
			return a.idx < b.idx
		}
		return a.f.Key < b.f.Key
	})
	out := make([]Finding, len(e.out))
	for i, r := range e.out {
		out[i] = r.f
	}
	return out
}

type ranked struct {
	f   Finding
	idx int
}

type evaluator struct {
	sub     Subject
	rule    *Rule
	idx     int
	out     []ranked
	seen    map[string]bool
	prev    map[taskID]*introspect.Process // Previous by identity, built on demand
	prevPID map[int]*introspect.Process    // Previous by pid, built on demand
	cur     map[int]*introspect.Process    // Processes by pid, built on demand
}

func (e *evaluator) add(kind, key string, summary string, ev Evidence) {
	key = strconv.Quote(e.rule.Name) + " " + kind + " " + key
	if e.seen[key] {
		return
	}
	e.seen[key] = true
	e.out = append(e.out, ranked{idx: e.idx, f: Finding{
		Rule: e.rule.Name, Severity: e.rule.Severity, Kind: kind, Key: key,
		Summary: summary, Evidence: ev,
	}})
}

func (e *evaluator) eval() {
	r := e.rule
	switch {
	case r.process != nil:
		for i := range e.sub.Processes {
			e.process(&e.sub.Processes[i])
		}
	case r.cred != nil, r.parent != nil:
		if e.sub.Previous == nil {
			return
		}
		for i := range e.sub.Processes {
			p := &e.sub.Processes[i]
			if q := e.previous(p); q != nil {
				if r.cred != nil {
					e.credChange(q, p)
				} else {
					e.parentChange(q, p)
				}
			}
		}
	case r.module != nil:
		for _, m := range e.sub.Modules {
			if (len(r.module.names) == 0 || matchAny(r.module.names, m.Name)) &&
				(!r.module.hasNotIn || !matchAny(r.module.notIn, m.Name)) {
				why := "is loaded"
				if r.module.hasNotIn {
					why += ", not on the allow-list"
				}
				e.add(KindModule, fmt.Sprintf("%s addr=%#x", m.Name, m.Addr),
					fmt.Sprintf("module %s at %#x %s", clean(m.Name), m.Addr, why),
					Evidence{Module: m.Name, Addr: hex(m.Addr)})
			}
		}
	case r.integrity != nil:
		for _, d := range e.sub.Deviations {
			if !r.integrity.kinds[d.Kind] {
				continue
			}
			e.add(KindIntegrity, d.Kind+" "+d.What, deviationSummary(d), Evidence{
				What:   d.What,
				Module: moduleOf(d.CurrentSymbol),
				Addr:   addrOf(d.Current),
				Before: withSymbol(d.Baseline, d.BaselineSymbol),
				After:  withSymbol(d.Current, d.CurrentSymbol),
			})
		}
	case r.hidden != nil:
		if r.hidden.processes {
			for _, h := range e.sub.HiddenProcesses {
				e.add(KindHiddenProcess, fmt.Sprintf("task=%#x pid=%d %s", h.Addr, h.PID, h.Name),
					fmt.Sprintf("process %s (pid %d, task %#x) is hidden: seen by %s, missing from %s", clean(h.Name), h.PID, h.Addr, views(h.SeenBy), views(h.MissingFrom)),
					Evidence{PID: h.PID, Comm: h.Name, Task: hex(h.Addr), SeenBy: h.SeenBy, MissingFrom: h.MissingFrom})
			}
		}
		if r.hidden.modules {
			for _, h := range e.sub.HiddenModules {
				e.add(KindHiddenModule, fmt.Sprintf("%s addr=%#x", h.Name, h.Addr),
					fmt.Sprintf("module %s (at %#x) is hidden: seen by %s, missing from %s", clean(h.Name), h.Addr, views(h.SeenBy), views(h.MissingFrom)),
					Evidence{Module: h.Name, Addr: hex(h.Addr), SeenBy: h.SeenBy, MissingFrom: h.MissingFrom})
			}
		}
	}
}

func taskKey(p *introspect.Process) string {
	return fmt.Sprintf("task=%#x pid=%d start=%d", p.Task, p.PID, p.StartTime)
}

func procEvidence(p *introspect.Process) Evidence {
	ev := Evidence{PID: p.PID, Comm: p.Comm, Task: hex(p.Task), Path: argv0(p)}
	if p.UID >= 0 {
		uid := p.UID
		ev.UID = &uid
	}
	return ev
}

func (e *evaluator) process(p *introspect.Process) {
	m := e.rule.process
	if len(m.names) > 0 && !matchComm(m.names, p.Comm) {
		return
	}
	if len(m.paths) > 0 && (len(p.Cmdline) == 0 || !matchAny(m.paths, p.Cmdline[0])) {
		return
	}
	desc := describe(p)
	summary := desc + " is running"
	if m.hasUIDs {
		if p.UID < 0 || slices.Contains(m.uidNotIn, p.UID) {
			return // unknown uid (offsets unsolved), or an allowed one
		}
		summary = fmt.Sprintf("%s runs as uid %d, not %s", desc, p.UID, uidList(m.uidNotIn))
	}
	if a := argv0(p); a != "" {
		summary += ": " + clean(a)
	}
	e.add(KindProcess, taskKey(p), summary, procEvidence(p))
}

// previous is p in the previous scan without an exec between: the same
// task, pid and start time, the same comm, and the same argv when both
// were read.
func (e *evaluator) previous(p *introspect.Process) *introspect.Process {
	if e.prev == nil {
		e.prev = make(map[taskID]*introspect.Process, len(e.sub.Previous))
		for i := range e.sub.Previous {
			q := &e.sub.Previous[i]
			e.prev[idOf(q)] = q
		}
	}
	q := e.prev[idOf(p)]
	if q == nil || q.Comm != p.Comm {
		return nil
	}
	if q.Cmdline != nil && p.Cmdline != nil && !slices.Equal(q.Cmdline, p.Cmdline) {
		return nil
	}
	return q
}

func (e *evaluator) credChange(q, p *introspect.Process) {
	if p.UID < 0 || q.UID < 0 || p.EUID < 0 || q.EUID < 0 {
		return
	}
	if e.rule.cred.toRoot {
		if !(p.UID == 0 && q.UID > 0) && !(p.EUID == 0 && q.EUID > 0) {
			return
		}
	} else if p.UID == q.UID && p.EUID == q.EUID {
		return
	}
	before, after := fmt.Sprintf("uid %d euid %d", q.UID, q.EUID), fmt.Sprintf("uid %d euid %d", p.UID, p.EUID)
	what := "changed credentials"
	if e.rule.cred.toRoot {
		what = "became root"
	}
	ev := procEvidence(p)
	ev.Before, ev.After = before, after
	e.add(KindCredChange, taskKey(p)+" "+after,
		fmt.Sprintf("%s %s without an exec: %s, was %s", describe(p), what, after, before), ev)
}

func (e *evaluator) parentChange(q, p *introspect.Process) {
	if p.PPID < 0 || q.PPID < 0 || p.PPID == q.PPID {
		return
	}
	if e.cur == nil {
		e.cur = byPID(e.sub.Processes)
		e.prevPID = byPID(e.sub.Previous)
	}
	// The old parent still runs when a task of its pid and start time
	// is in this scan; else the task was orphaned, a reparenting the
	// kernel does itself.
	alive := true
	if old := e.prevPID[q.PPID]; old != nil {
		c := e.cur[old.PID]
		alive = c != nil && c.StartTime == old.StartTime
	}
	if !alive && !e.rule.parent.orphans {
		return
	}
	before, after := fmt.Sprintf("ppid %d", q.PPID), fmt.Sprintf("ppid %d", p.PPID)
	why := "the old parent still runs"
	if !alive {
		why = "the old parent exited"
	}
	ev := procEvidence(p)
	ev.Before, ev.After = before, after
	e.add(KindParentChange, taskKey(p)+" "+after,
		fmt.Sprintf("%s changed parent without an exec: %s, was %s (%s)", describe(p), after, before, why), ev)
}

func byPID(ps []introspect.Process) map[int]*introspect.Process {
	m := make(map[int]*introspect.Process, len(ps))
	for i := range ps {
		if _, ok := m[ps[i].PID]; !ok {
			m[ps[i].PID] = &ps[i]
		}
	}
	return m
}

func deviationSummary(d introspect.Deviation) string {
	s := fmt.Sprintf("%s (%s)", clean(d.What), d.Kind)
	if d.Current != "" {
		s += ": " + clean(withSymbol(d.Current, d.CurrentSymbol))
	}
	if d.Baseline != "" {
		s += ", baseline " + clean(withSymbol(d.Baseline, d.BaselineSymbol))
	}
	if d.Detail != "" {
		s += ": " + clean(d.Detail)
	}
	return s
}

func withSymbol(v, sym string) string {
	if v == "" || sym == "" {
		return v
	}
	return v + " " + sym
}

// moduleOf is "m" of a symbol "name [m]".
func moduleOf(sym string) string {
	if i := strings.LastIndex(sym, " ["); i >= 0 && strings.HasSuffix(sym, "]") {
		return sym[i+2 : len(sym)-1]
	}
	return ""
}

func addrOf(v string) string {
	if strings.HasPrefix(v, "0x") && !strings.Contains(v, " ") {
		return v
	}
	return ""
}

func describe(p *introspect.Process) string {
	return fmt.Sprintf("%s (pid %d)", clean(p.Comm), p.PID)
}

func argv0(p *introspect.Process) string {
	if len(p.Cmdline) == 0 {
		return ""
	}
	return p.Cmdline[0]
}

func hex(v uint64) string { return fmt.Sprintf("%#x", v) }

func views(v []string) string {
	if len(v) == 0 {
		return "no view"
	}
	return clean(strings.Join(v, ", "))
}

func uidList(uids []int) string {
	if len(uids) == 0 {
		return "any allowed uid (none is)"
	}
	s := make([]string, len(uids))
	for i, u := range uids {
		s[i] = strconv.Itoa(u)
	}
	return strings.Join(s, " or ")
}

// clean makes a guest string safe on one line: control and other
// unprintable characters become '?', and it is cut at 200 runes.
func clean(s string) string {
	var b strings.Builder
	n := 0
	for _, r := range s {
		if n == 200 {
			b.WriteString("…")
			break
		}
		if r == unicode.ReplacementChar || !unicode.IsPrint(r) {
			r = '?'
		}
		b.WriteRune(r)
		n++
	}
	return b.String()
}

// matchComm matches a comm against names: a name longer than a comm can
// be (15 bytes) matches the comm the kernel cut it to.
func matchComm(names []string, comm string) bool {
	for _, n := range names {
		if !isGlob(n) && len(n) > commLen {
			n = n[:commLen]
		}
		if glob(n, comm) {
			return true
		}
	}
	return false
}

func matchAny(patterns []string, s string) bool {
	for _, p := range patterns {
		if glob(p, s) {
			return true
		}
	}
	return false
}

func isGlob(p string) bool { return strings.ContainsAny(p, "*?") }

// glob matches s against p, where * is any run of bytes ('/' too) and ?
// any one byte; everything else is itself.
func glob(p, s string) bool {
	if !isGlob(p) {
		return p == s
	}
	px, sx := 0, 0
	starP, starS := -1, 0
	for sx < len(s) {
		switch {
		case px < len(p) && (p[px] == '?' || p[px] == s[sx]):
			px++
			sx++
		case px < len(p) && p[px] == '*':
			starP, starS = px, sx
			px++
		case starP >= 0:
			px = starP + 1
			starS++
			sx = starS
		default:
			return false
		}
	}
	for px < len(p) && p[px] == '*' {
		px++
	}
	return px == len(p)
}
