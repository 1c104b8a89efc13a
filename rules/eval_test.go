package rules

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/kvmscope/kvmscope/introspect"
)

func mustParse(t *testing.T, text string) *Set {
	t.Helper()
	s, err := Parse([]byte(text), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Processes as a Debian guest's scan lists them.
func guestProcesses() []introspect.Process {
	return []introspect.Process{
		{PID: 1, TGID: 1, PPID: 0, UID: 0, EUID: 0, Comm: "systemd", State: "S", Threads: 1, StartTime: 1_000_000, PGD: 0x1234000, Cmdline: []string{"/sbin/init"}, Task: 0xffff888003a08000},
		{PID: 2, TGID: 2, PPID: 0, UID: 0, EUID: 0, Comm: "kthreadd", State: "S", KThread: true, Threads: 1, StartTime: 1_000_100, Task: 0xffff888003a0a500},
		{PID: 812, TGID: 812, PPID: 1, UID: 0, EUID: 0, Comm: "sshd", State: "S", Threads: 1, StartTime: 4_000_000_000, Cmdline: []string{"sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups"}, Task: 0xffff888005c80000},
		{PID: 1700, TGID: 1700, PPID: 812, UID: 1000, EUID: 1000, Comm: "sshd", State: "S", Threads: 1, StartTime: 90_000_000_000, Cmdline: []string{"sshd: alice@pts/0"}, Task: 0xffff888006d41280},
		{PID: 1701, TGID: 1701, PPID: 1700, UID: 1000, EUID: 1000, Comm: "bash", State: "S", Threads: 1, StartTime: 90_100_000_000, Cmdline: []string{"-bash"}, Task: 0xffff888006d43700},
		{PID: 4242, TGID: 4242, PPID: 1701, UID: 1000, EUID: 1000, Comm: "crypto-miner", State: "R", Threads: 4, StartTime: 95_000_000_000, Cmdline: []string{"/tmp/.x/crypto-miner", "--pool", "stratum+tcp://pool:3333"}, Task: 0xffff888007110000},
	}
}

func TestEvaluateDocExample(t *testing.T) {
	s := mustParse(t, docExample)
	fs := s.Evaluate(Subject{Processes: guestProcesses()})
	if len(fs) != 2 {
		t.Fatalf("%d findings, want 2 (the miner, alice's sshd): %+v", len(fs), fs)
	}
	miner, sshd := fs[0], fs[1]
	if miner.Rule != "no miners" || miner.Severity != High || miner.Kind != KindProcess || miner.Evidence.PID != 4242 ||
		miner.Evidence.Comm != "crypto-miner" || miner.Evidence.Path != "/tmp/.x/crypto-miner" || miner.Evidence.Task != "0xffff888007110000" ||
		miner.Evidence.UID == nil || *miner.Evidence.UID != 1000 {
		t.Errorf("miner finding = %+v", miner)
	}
	if !strings.Contains(miner.Summary, "crypto-miner (pid 4242) is running") {
		t.Errorf("miner summary %q", miner.Summary)
	}
	// sshd as root (pid 812) does not match; alice's (uid 1000) does.
	if sshd.Rule != "only root runs sshd" || sshd.Severity != Medium || sshd.Evidence.PID != 1700 || *sshd.Evidence.UID != 1000 {
		t.Errorf("sshd finding = %+v", sshd)
	}
	if !strings.Contains(sshd.Summary, "runs as uid 1000, not 0") {
		t.Errorf("sshd summary %q", sshd.Summary)
	}
	// Keys are the rule and the task: the same in the next scan, another
	// for a new task reusing the pid.
	again := s.Evaluate(Subject{Processes: guestProcesses()})
	if !reflect.DeepEqual(fs, again) {
		t.Error("Evaluate is not deterministic")
	}
	ps := guestProcesses()
	ps[5].StartTime++
	if other := s.Evaluate(Subject{Processes: ps}); other[0].Key == miner.Key {
		t.Error("a new task with the pid has the old one's key")
	}
	// Only root's sshd: nothing.
	if fs := s.Evaluate(Subject{Processes: guestProcesses()[:3]}); len(fs) != 0 {
		t.Errorf("root's sshd matched: %+v", fs)
	}
	// Unknown uids (offsets not solved) match no uid rule.
	ps = guestProcesses()
	for i := range ps {
		ps[i].UID, ps[i].EUID = -1, -1
	}
	unknown := s.Evaluate(Subject{Processes: ps})
	if len(unknown) != 1 || unknown[0].Rule != "no miners" || unknown[0].Evidence.UID != nil {
		t.Fatalf("unknown uids: %+v", unknown)
	}
	b, err := json.Marshal(unknown[0])
	if err != nil || !strings.Contains(string(b), `"severity":"high"`) || strings.Contains(string(b), `"uid"`) {
		t.Errorf("JSON %s %v", b, err)
	}
}

func TestEvaluateGlobsAndPaths(t *testing.T) {
	s := mustParse(t, `rules:
  - {name: tmp, severity: critical, process: {path: ["/tmp/*", "/dev/shm/*"]}}
  - {name: shells, severity: info, process: {name: "*sh"}}
  - {name: long, severity: low, process: {name: crypto-miner-daemon-x}}
`)
	ps := guestProcesses()
	ps = append(ps, introspect.Process{PID: 5000, UID: 0, Comm: "crypto-miner-da", Cmdline: []string{"./crypto-miner-daemon-x"}, Task: 0xffff888007200000, StartTime: 7})
	var got []string
	for _, f := range s.Evaluate(Subject{Processes: ps}) {
		got = append(got, f.Rule+":"+f.Evidence.Comm)
	}
	want := []string{"tmp:crypto-miner", "long:crypto-miner-da", "shells:bash"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("findings %v, want %v (by severity)", got, want)
	}
}

func TestEvaluateCredChange(t *testing.T) {
	s := mustParse(t, `rules:
  - {name: root, severity: critical, cred_change: {to_root: true}}
`)
	prev := guestProcesses()
	cur := guestProcesses()
	cur[4].UID, cur[4].EUID = 0, 0 // bash became root in place: same task, comm, argv
	if fs := s.Evaluate(Subject{Processes: cur}); len(fs) != 0 {
		t.Errorf("first scan (no previous) judged: %+v", fs)
	}
	fs := s.Evaluate(Subject{Processes: cur, Previous: prev})
	if len(fs) != 1 {
		t.Fatalf("%d findings, want 1: %+v", len(fs), fs)
	}
	f := fs[0]
	if f.Kind != KindCredChange || f.Evidence.PID != 1701 || f.Evidence.Before != "uid 1000 euid 1000" || f.Evidence.After != "uid 0 euid 0" ||
		!strings.Contains(f.Summary, "bash (pid 1701) became root without an exec") {
		t.Errorf("finding = %+v", f)
	}
	// Only the euid: still to root.
	cur = guestProcesses()
	cur[4].EUID = 0
	if fs := s.Evaluate(Subject{Processes: cur, Previous: prev}); len(fs) != 1 {
		t.Errorf("euid to 0: %d findings", len(fs))
	}
	// An exec of a setuid program changes comm (and argv): not matched.
	cur = guestProcesses()
	cur[4].UID, cur[4].EUID, cur[4].Comm, cur[4].Cmdline = 1000, 0, "sudo", []string{"sudo", "-i"}
	if fs := s.Evaluate(Subject{Processes: cur, Previous: prev}); len(fs) != 0 {
		t.Errorf("exec of sudo matched: %+v", fs)
	}
	// The same comm but another argv is an exec too.
	cur = guestProcesses()
	cur[4].UID, cur[4].EUID, cur[4].Cmdline = 0, 0, []string{"bash", "-p"}
	if fs := s.Evaluate(Subject{Processes: cur, Previous: prev}); len(fs) != 0 {
		t.Errorf("exec with another argv matched: %+v", fs)
	}
	// Another task at the pid (another start time): not a change.
	cur = guestProcesses()
	cur[4].UID, cur[4].EUID, cur[4].StartTime = 0, 0, cur[4].StartTime+1
	if fs := s.Evaluate(Subject{Processes: cur, Previous: prev}); len(fs) != 0 {
		t.Errorf("a new task matched: %+v", fs)
	}
	// Root dropping to a user is no change to root, but is a change.
	cur = guestProcesses()
	cur[2].UID, cur[2].EUID = 105, 105
	if fs := s.Evaluate(Subject{Processes: cur, Previous: prev}); len(fs) != 0 {
		t.Errorf("a drop matched to_root: %+v", fs)
	}
	any := mustParse(t, "rules:\n  - {name: any, severity: low, cred_change: {}}\n")
	if fs := any.Evaluate(Subject{Processes: cur, Previous: prev}); len(fs) != 1 || fs[0].Evidence.After != "uid 105 euid 105" {
		t.Errorf("cred_change: {}: %+v", fs)
	}
}

func TestEvaluateParentChange(t *testing.T) {
	s := mustParse(t, `rules:
  - {name: reparent, severity: high, parent_change: true}
  - {name: orphans, severity: info, parent_change: {orphans: true}}
`)
	prev := guestProcesses()
	// The miner moved under init while its shell still runs.
	cur := guestProcesses()
	cur[5].PPID = 1
	fs := s.Evaluate(Subject{Processes: cur, Previous: prev})
	if len(fs) != 2 || fs[0].Rule != "reparent" || fs[0].Evidence.Before != "ppid 1701" || fs[0].Evidence.After != "ppid 1" ||
		!strings.Contains(fs[0].Summary, "old parent still runs") || fs[1].Rule != "orphans" {
		t.Fatalf("findings = %+v", fs)
	}
	// The shell exited: an orphan, which only orphans: true reports.
	cur = append(guestProcesses()[:4], guestProcesses()[5])
	cur[4].PPID = 1
	fs = s.Evaluate(Subject{Processes: cur, Previous: prev})
	if len(fs) != 1 || fs[0].Rule != "orphans" || !strings.Contains(fs[0].Summary, "old parent exited") {
		t.Errorf("orphan findings = %+v", fs)
	}
}

func TestEvaluateModules(t *testing.T) {
	s := mustParse(t, `rules:
  - name: allow-list
    severity: high
    module: {not_in: [ext4, jbd2, mbcache, "virtio_*", crc32c_generic]}
  - {name: known rootkits, severity: critical, module: {name: [diamorphine, reptile*]}}
`)
	mods := []introspect.Module{
		{Name: "virtio_net", Base: 0xffffffffc0200000, Size: 61440, State: "live", Addr: 0xffffffffc0210040},
		{Name: "ext4", Base: 0xffffffffc0300000, Size: 1003520, State: "live", Addr: 0xffffffffc03e0100},
		{Name: "diamorphine", Base: 0xffffffffc0a00000, Size: 16384, State: "live", Addr: 0xffffffffc0a02000},
	}
	fs := s.Evaluate(Subject{Modules: mods})
	if len(fs) != 2 {
		t.Fatalf("%d findings, want 2: %+v", len(fs), fs)
	}
	if fs[0].Rule != "known rootkits" || fs[1].Rule != "allow-list" {
		t.Errorf("order %s, %s: want critical first", fs[0].Rule, fs[1].Rule)
	}
	for _, f := range fs {
		if f.Kind != KindModule || f.Evidence.Module != "diamorphine" || f.Evidence.Addr != "0xffffffffc0a02000" {
			t.Errorf("finding = %+v", f)
		}
	}
	if !strings.Contains(fs[1].Summary, "not on the allow-list") {
		t.Errorf("summary %q", fs[1].Summary)
	}
	if fs := s.Evaluate(Subject{Modules: mods[:2]}); len(fs) != 0 {
		t.Errorf("allowed modules matched: %+v", fs)
	}
}

func TestEvaluateIntegrityAndHidden(t *testing.T) {
	s := mustParse(t, `rules:
  - {name: dispatch, severity: critical, integrity: {kinds: [table, code, call_target, idt]}}
  - {name: ftrace, severity: info, integrity: {kinds: [runtime_patch]}}
  - {name: hidden, severity: high, hidden: {processes: true, modules: true}}
`)
	devs := []introspect.Deviation{
		{What: "sys_call_table[62]", Kind: "table", Current: "0xffffffffc0a01000", CurrentSymbol: "hacked_kill+0x0 [diamorphine]", Baseline: "0xffffffff810b2a40", BaselineSymbol: "__x64_sys_kill+0x0", Detail: "not a system-call function in core kernel text"},
		{What: "x64_sys_call+0x1a3", Kind: "runtime_patch", Current: "0xffffffffc0300000", Detail: "traced by ftrace"},
		{What: "vcpu0.lstar", Kind: "msr", Current: "0xffffffffc0a03000"},
	}
	hidden := []Hidden{{Name: "evil", PID: 666, Addr: 0xffff888007300000, SeenBy: []string{"pid_hash"}, MissingFrom: []string{"tasks"}}}
	hmods := []Hidden{{Name: "diamorphine", Addr: 0xffffffffc0a02000, SeenBy: []string{"kobjects"}, MissingFrom: []string{"modules"}}}
	fs := s.Evaluate(Subject{Deviations: devs, HiddenProcesses: hidden, HiddenModules: hmods})
	var got []string
	for _, f := range fs {
		got = append(got, f.Rule+":"+f.Kind)
	}
	want := []string{"dispatch:integrity", "hidden:hidden_module", "hidden:hidden_process", "ftrace:integrity"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("findings %v, want %v", got, want)
	}
	d := fs[0]
	if d.Evidence.What != "sys_call_table[62]" || d.Evidence.Module != "diamorphine" || d.Evidence.Addr != "0xffffffffc0a01000" ||
		d.Evidence.Before != "0xffffffff810b2a40 __x64_sys_kill+0x0" || !strings.Contains(d.Summary, "sys_call_table[62] (table)") {
		t.Errorf("deviation finding = %+v", d)
	}
	hp := fs[2]
	if hp.Evidence.PID != 666 || hp.Evidence.Task != "0xffff888007300000" || !reflect.DeepEqual(hp.Evidence.MissingFrom, []string{"tasks"}) ||
		!strings.Contains(hp.Summary, "seen by pid_hash, missing from tasks") {
		t.Errorf("hidden process finding = %+v", hp)
	}
}

func TestJudged(t *testing.T) {
	if k := (Subject{}).Judged(); len(k) != 0 {
		t.Errorf("empty subject judges %v", k)
	}
	k := Subject{Processes: []introspect.Process{}, Previous: []introspect.Process{}, Deviations: []introspect.Deviation{}}.Judged()
	if !reflect.DeepEqual(k, []string{KindProcess, KindCredChange, KindParentChange, KindIntegrity}) {
		t.Errorf("judged %v", k)
	}
}

func TestSummaryIsOneLine(t *testing.T) {
	s := mustParse(t, "rules:\n  - {name: all, severity: low, process: {name: \"*\"}}\n")
	ps := []introspect.Process{{PID: 9, Comm: "x\ny\x1b[31m", Cmdline: []string{"a\nb"}, UID: 0}}
	fs := s.Evaluate(Subject{Processes: ps})
	if len(fs) != 1 || strings.ContainsAny(fs[0].Summary, "\n\x1b") || fs[0].Evidence.Comm != "x\ny\x1b[31m" {
		t.Errorf("finding = %+v", fs)
	}
}

func TestGlob(t *testing.T) {
	for _, tc := range []struct {
		p, s string
		want bool
	}{
		{"sshd", "sshd", true}, {"sshd", "sshd2", false}, {"*", "", true}, {"kworker*", "kworker/0:1", true},
		{"/tmp/*", "/tmp/a/b", true}, {"?sh", "zsh", true}, {"?sh", "bash", false}, {"*sh", "bash", true},
		{"a*b*c", "axxbyyc", true}, {"a*b*c", "axxbyy", false}, {"virtio_*", "virtio_net", true},
	} {
		if got := glob(tc.p, tc.s); got != tc.want {
			t.Errorf("glob(%q, %q) = %v", tc.p, tc.s, got)
		}
	}
}
