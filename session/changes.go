package session

import (
	"fmt"

	"github.com/kvmscope/kvmscope/introspect"
)

// Events receives what the session observes (internal/eventlog.Log is
// one).
type Events interface {
	Append(kind string, fields any) (uint64, error)
}

// ProcessEvent is a process that appeared or disappeared between two
// scheduled scans (kinds process_start and process_exit), or that
// executed another program (process_exec: same pid and start time, new
// comm). It comes from
// comparing scans, not from the guest's fork and exit: a process that
// lives shorter than the scan interval is never seen, and the time is the
// scan's, not the event's (StartTime is the guest's own).
type ProcessEvent struct {
	PID       int      `json:"pid"`
	PPID      int      `json:"ppid"`
	UID       int      `json:"uid"`
	Comm      string   `json:"comm"`
	Cmdline   []string `json:"cmdline,omitempty"`
	StartTime uint64   `json:"start_time_ns"`
	Task      string   `json:"task"`
	// Was is the comm before, for process_exec.
	Was string `json:"was,omitempty"`
}

// ModuleEvent is a kernel module loaded or unloaded between two scans
// (kinds module_load and module_unload).
type ModuleEvent struct {
	Name string `json:"name"`
	Base string `json:"base"`
	Size uint64 `json:"size"`
}

// changes remembers the previous scan to report what changed.
type changes struct {
	procs   map[procKey]introspect.Process
	modules map[modKey]introspect.Module
}

// A pid can be reused: a process is its pid and its start time.
type procKey struct {
	pid   int
	start uint64
}

type modKey struct {
	name string
	base uint64
}

func procEvent(p introspect.Process) ProcessEvent {
	return ProcessEvent{PID: p.PID, PPID: p.PPID, UID: p.UID, Comm: p.Comm, Cmdline: p.Cmdline, StartTime: p.StartTime, Task: fmt.Sprintf("%#x", p.Task)}
}

// sawProcesses reports the processes started and gone since the last scan.
// The first scan is the baseline and reports nothing.
func (c *changes) sawProcesses(ev Events, ps []introspect.Process) {
	cur := make(map[procKey]introspect.Process, len(ps))
	for _, p := range ps {
		cur[procKey{p.PID, p.StartTime}] = p
	}
	if c.procs != nil {
		for _, p := range ps {
			old, ok := c.procs[procKey{p.PID, p.StartTime}]
			switch {
			case !ok:
				ev.Append("process_start", procEvent(p))
			case old.Comm != p.Comm:
				// Same task, new program: an exec (comm is the
				// executed file's name).
				e := procEvent(p)
				e.Was = old.Comm
				ev.Append("process_exec", e)
			}
		}
		for k, p := range c.procs {
			if _, ok := cur[k]; !ok {
				ev.Append("process_exit", procEvent(p))
			}
		}
	}
	c.procs = cur
}

// sawModules reports the modules loaded and unloaded since the last scan.
func (c *changes) sawModules(ev Events, ms []introspect.Module) {
	cur := make(map[modKey]introspect.Module, len(ms))
	for _, m := range ms {
		cur[modKey{m.Name, m.Base}] = m
	}
	if c.modules != nil {
		for _, m := range ms {
			if _, ok := c.modules[modKey{m.Name, m.Base}]; !ok {
				ev.Append("module_load", ModuleEvent{Name: m.Name, Base: fmt.Sprintf("%#x", m.Base), Size: m.Size})
			}
		}
		for k, m := range c.modules {
			if _, ok := cur[k]; !ok {
				ev.Append("module_unload", ModuleEvent{Name: m.Name, Base: fmt.Sprintf("%#x", m.Base), Size: m.Size})
			}
		}
	}
	c.modules = cur
}
