package rules

import (
	"sync"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/introspect"
)

func keys(fs []Finding) []string {
	var k []string
	for _, f := range fs {
		k = append(k, f.Key)
	}
	return k
}

func TestTracker(t *testing.T) {
	s := mustParse(t, docExample)
	t0 := time.Date(2026, 12, 3, 18, 0, 0, 0, time.UTC)
	var tr Tracker
	fs := s.Evaluate(Subject{Processes: guestProcesses()})
	if n := tr.Observe(t0, fs); len(n) != 2 {
		t.Fatalf("first scan: %d new, want 2", len(n))
	}
	// The same findings again: nothing new; counted, last seen moves.
	if n := tr.Observe(t0.Add(5*time.Second), s.Evaluate(Subject{Processes: guestProcesses()})); len(n) != 0 {
		t.Errorf("second scan: new %v", keys(n))
	}
	// The miner exits.
	ps := guestProcesses()[:5]
	if n := tr.Observe(t0.Add(10*time.Second), s.Evaluate(Subject{Processes: ps})); len(n) != 0 {
		t.Errorf("third scan: new %v", keys(n))
	}
	all := tr.All()
	if len(all) != 2 {
		t.Fatalf("All: %d, want 2", len(all))
	}
	miner, sshd := all[0], all[1] // high before medium
	if miner.Rule != "no miners" || miner.Active || miner.Count != 2 || !miner.FirstSeen.Equal(t0) || !miner.LastSeen.Equal(t0.Add(5*time.Second)) {
		t.Errorf("miner tracked = %+v", miner)
	}
	if sshd.Rule != "only root runs sshd" || !sshd.Active || sshd.Count != 3 || !sshd.LastSeen.Equal(t0.Add(10*time.Second)) {
		t.Errorf("sshd tracked = %+v", sshd)
	}
	// The same task seen again is new again (one more event), its first
	// sighting kept.
	n := tr.Observe(t0.Add(15*time.Second), fs)
	if len(n) != 1 || n[0].Key != miner.Key {
		t.Errorf("fourth scan: new %v, want the miner", keys(n))
	}
	if m := tr.All()[0]; !m.Active || m.Count != 3 || !m.FirstSeen.Equal(t0) {
		t.Errorf("miner tracked = %+v", m)
	}
	// Duplicates in one observation count once.
	if n := tr.Observe(t0.Add(20*time.Second), append(fs, fs...)); len(n) != 0 || tr.All()[0].Count != 4 {
		t.Errorf("duplicates: new %v, count %d", keys(n), tr.All()[0].Count)
	}
}

func TestTrackerPartial(t *testing.T) {
	s := mustParse(t, `rules:
  - {name: miner, severity: high, process: {name: crypto-miner}}
  - {name: dispatch, severity: critical, integrity: {}}
`)
	devs := []introspect.Deviation{{What: "sys_call_table[62]", Kind: "table", Current: "0xffffffffc0a01000"}}
	var tr Tracker
	t0 := time.Unix(1000, 0)
	sub := Subject{Processes: guestProcesses(), Deviations: devs}
	if n := tr.ObservePartial(t0, s.Evaluate(sub), sub.Judged()); len(n) != 2 {
		t.Fatalf("new %v", keys(n))
	}
	// A scan that did not check integrity keeps the deviation active:
	// no second event when the next check sees it again.
	sub = Subject{Processes: guestProcesses()}
	tr.ObservePartial(t0.Add(time.Second), s.Evaluate(sub), sub.Judged())
	if all := tr.All(); !all[0].Active || all[0].Kind != KindIntegrity || all[0].Count != 1 {
		t.Errorf("integrity finding after a scan without the check: %+v", all[0])
	}
	sub = Subject{Processes: guestProcesses(), Deviations: devs}
	if n := tr.ObservePartial(t0.Add(2*time.Second), s.Evaluate(sub), sub.Judged()); len(n) != 0 {
		t.Errorf("new %v", keys(n))
	}
	// A check that finds it gone ends it.
	sub = Subject{Processes: guestProcesses(), Deviations: []introspect.Deviation{}}
	tr.ObservePartial(t0.Add(3*time.Second), s.Evaluate(sub), sub.Judged())
	if all := tr.All(); all[0].Active || all[0].Count != 2 {
		t.Errorf("integrity finding after a clean check: %+v", all[0])
	}
}

func TestTrackerBounded(t *testing.T) {
	var tr Tracker
	t0 := time.Unix(0, 0)
	for i := 0; i < maxInactive+100; i++ {
		tr.Observe(t0.Add(time.Duration(i)*time.Second), []Finding{{Key: string(rune('a'+i%26)) + time.Duration(i).String(), Kind: KindProcess}})
	}
	if n := len(tr.All()); n != maxInactive+1 {
		t.Errorf("%d tracked, want %d (the bound and the active one)", n, maxInactive+1)
	}
}

func TestTrackerConcurrent(t *testing.T) {
	s := mustParse(t, docExample)
	var tr Tracker
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; j < 100; j++ {
				tr.Observe(time.Unix(int64(i*1000+j), 0), s.Evaluate(Subject{Processes: guestProcesses()}))
				tr.All()
			}
		}(i)
	}
	wg.Wait()
	if all := tr.All(); len(all) != 2 || all[0].Count != 800 {
		t.Errorf("tracked %+v", all)
	}
}
