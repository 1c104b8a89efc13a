package rules

import (
	"sort"
	"sync"
	"time"
)

// Tracked is a finding over scans: when it was first and last seen, in
// how many observations, and whether the latest saw it.
type Tracked struct {
	Finding
	FirstSeen time.Time `json:"first_seen"`
	LastSeen  time.Time `json:"last_seen"`
	Count     int       `json:"count"`
	Active    bool      `json:"active"`
}

// maxInactive bounds the findings a Tracker remembers that are no longer
// seen; past it the ones seen longest ago are forgotten.
const maxInactive = 4096

// Tracker follows findings across scans by Key, for reports and for one
// event per new finding. The zero Tracker is ready; it is safe for
// concurrent use.
type Tracker struct {
	mu sync.Mutex
	m  map[string]*Tracked
}

// Observe records the findings of one scan that judged every kind:
// each is seen now, and findings not among them are no longer active.
// It returns the findings that were not active before (new ones, and
// ones seen again after a scan without them), in the order of fs.
func (t *Tracker) Observe(now time.Time, fs []Finding) []Finding {
	return t.observe(now, fs, nil)
}

// ObservePartial is Observe for a scan that judged only the kinds listed
// (Subject.Judged): findings of other kinds keep their state.
func (t *Tracker) ObservePartial(now time.Time, fs []Finding, judged []string) []Finding {
	k := make(map[string]bool, len(judged))
	for _, j := range judged {
		k[j] = true
	}
	return t.observe(now, fs, k)
}

func (t *Tracker) observe(now time.Time, fs []Finding, judged map[string]bool) []Finding {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m = map[string]*Tracked{}
	}
	seen := make(map[string]bool, len(fs))
	var fresh []Finding
	for _, f := range fs {
		if seen[f.Key] {
			continue
		}
		seen[f.Key] = true
		tr := t.m[f.Key]
		if tr == nil {
			tr = &Tracked{FirstSeen: now}
			t.m[f.Key] = tr
		}
		if !tr.Active {
			fresh = append(fresh, f)
		}
		tr.Finding, tr.LastSeen, tr.Active = f, now, true
		tr.Count++
	}
	inactive := 0
	for k, tr := range t.m {
		if tr.Active && !seen[k] && (judged == nil || judged[tr.Kind]) {
			tr.Active = false
		}
		if !tr.Active {
			inactive++
		}
	}
	if inactive > maxInactive {
		old := make([]*Tracked, 0, inactive)
		for _, tr := range t.m {
			if !tr.Active {
				old = append(old, tr)
			}
		}
		sort.Slice(old, func(i, j int) bool {
			if !old[i].LastSeen.Equal(old[j].LastSeen) {
				return old[i].LastSeen.Before(old[j].LastSeen)
			}
			return old[i].Key < old[j].Key
		})
		for _, tr := range old[:inactive-maxInactive] {
			delete(t.m, tr.Key)
		}
	}
	return fresh
}

// All is every finding tracked: highest severity first, then active ones
// before those no longer seen, then first seen earliest, then key.
func (t *Tracker) All() []Tracked {
	t.mu.Lock()
	out := make([]Tracked, 0, len(t.m))
	for _, tr := range t.m {
		c := *tr
		c.Evidence.SeenBy = append([]string(nil), tr.Evidence.SeenBy...)
		c.Evidence.MissingFrom = append([]string(nil), tr.Evidence.MissingFrom...)
		out = append(out, c)
	}
	t.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		switch {
		case a.Severity != b.Severity:
			return a.Severity > b.Severity
		case a.Active != b.Active:
			return a.Active
		case !a.FirstSeen.Equal(b.FirstSeen):
			return a.FirstSeen.Before(b.FirstSeen)
		}
		return a.Key < b.Key
	})
	return out
}
