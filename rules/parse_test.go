package rules

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The first example of docs/rules.md.
const docExample = `rules:
  - name: no miners
    severity: high
    process: {name: crypto-miner}
  - name: only root runs sshd
    severity: medium
    process: {name: sshd, uid_not_in: [0]}
`

func TestParseDocExample(t *testing.T) {
	s, err := Parse([]byte(docExample), "rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if s.Source != "rules.yaml" || s.Scan != nil || len(s.Rules) != 2 {
		t.Fatalf("set = %+v", s)
	}
	r0, r1 := s.Rules[0], s.Rules[1]
	if r0.Name != "no miners" || r0.Severity != High || r0.Line != 2 || r0.Matcher() != "process" {
		t.Errorf("rule 0 = %+v", r0)
	}
	if r1.Name != "only root runs sshd" || r1.Severity != Medium || r1.Line != 5 {
		t.Errorf("rule 1 = %+v", r1)
	}
	if m := r1.process; m == nil || len(m.names) != 1 || m.names[0] != "sshd" || !m.hasUIDs || len(m.uidNotIn) != 1 || m.uidNotIn[0] != 0 {
		t.Errorf("rule 1 matcher = %+v", r1.process)
	}
}

func TestParseEveryMatcher(t *testing.T) {
	text := `# every key
scan:
  interval: 5s
  jitter: 0.1
  max_cpu: 200ms
  max_bytes: 64MiB
  max_duty: 0.05
  busy_load: 1.5
rules:
  - {name: paths, severity: critical, process: {path: ["/tmp/*", /dev/shm/*]}}
  - name: root
    severity: high
    cred_change: {to_root: true}
  - {name: reparent, severity: low, parent_change: true}
  - {name: orphans, severity: info, parent_change: {orphans: true}}
  - {name: modules, severity: medium, module: {not_in: [ext4, "virtio_*"]}}
  - {name: bad module, severity: high, module: {name: diamorphine}}
  - {name: dispatch, severity: critical, integrity: {kinds: [table, code, call_target, idt]}}
  - {name: all dispatch, severity: high, integrity: {}}
  - {name: hidden, severity: critical, hidden: {processes: true, modules: true}}
`
	s, err := Parse([]byte(text), "all.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"process", "cred_change", "parent_change", "parent_change", "module", "module", "integrity", "integrity", "hidden"}
	if len(s.Rules) != len(want) {
		t.Fatalf("%d rules, want %d", len(s.Rules), len(want))
	}
	for i, w := range want {
		if got := s.Rules[i].Matcher(); got != w {
			t.Errorf("rule %d matches %s, want %s", i, got, w)
		}
	}
	sc := s.Scan
	if sc == nil || *sc.Interval != 5*time.Second || *sc.Jitter != 0.1 || *sc.MaxCPU != 200*time.Millisecond ||
		*sc.MaxBytes != 64<<20 || *sc.MaxDuty != 0.05 || *sc.BusyLoad != 1.5 {
		t.Errorf("scan = %+v", sc)
	}
	if k := s.Rules[7].integrity.kinds; !k["table"] || !k["msr"] || k["runtime_patch"] {
		t.Errorf("integrity: {} kinds = %v; want all but runtime_patch", k)
	}
	if s.Rules[2].parent.orphans || !s.Rules[3].parent.orphans {
		t.Errorf("orphans: %v %v", s.Rules[2].parent, s.Rules[3].parent)
	}
}

func TestParseEmptyRules(t *testing.T) {
	for _, text := range []string{"rules: []\n", "rules:\n", "scan: {interval: 1m}\n"} {
		s, err := Parse([]byte(text), "e.yaml")
		if err != nil || len(s.Rules) != 0 {
			t.Errorf("%q: %v, %+v", text, err, s)
		}
	}
	// A partial scan: section leaves the other fields nil.
	s, _ := Parse([]byte("scan: {interval: 1m}\n"), "e.yaml")
	if s.Scan == nil || *s.Scan.Interval != time.Minute || s.Scan.Jitter != nil || s.Scan.MaxBytes != nil {
		t.Errorf("scan = %+v", s.Scan)
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct{ name, text, want string }{
		{"bad severity", "rules:\n  - name: a\n    severity: urgent\n    process: {name: x}\n",
			`f.yaml:3: severity: unknown severity "urgent" (want info, low, medium, high or critical)`},
		{"missing severity", "rules:\n  - name: a\n    process: {name: x}\n", `f.yaml:2: rule "a": severity: missing`},
		{"unknown key", "rules:\n  - name: a\n    severity: low\n    proces: {name: x}\n", `f.yaml:4: unknown key "proces" in a rule`},
		{"unknown matcher key", "rules:\n  - name: a\n    severity: low\n    process:\n      name: x\n      uid_notin: [0]\n", `f.yaml:6: unknown key "uid_notin" in process:`},
		{"unknown top key", "rule:\n  - name: a\n", `f.yaml:1: unknown key "rule" (want rules or scan)`},
		{"missing name", "rules:\n  - name: a\n    severity: low\n    process: {name: x}\n  - severity: low\n    process: {name: y}\n", `f.yaml:5: rule at line 5: name: missing`},
		{"bad uid type", "rules:\n  - name: a\n    severity: low\n    process:\n      name: sshd\n      uid_not_in: [0, root]\n", `f.yaml:6: process: uid_not_in: "root" is not a uid`},
		{"null uids", "rules:\n  - name: a\n    severity: low\n    process: {name: sshd, uid_not_in: }\n", `f.yaml:4: process: uid_not_in: want a list of uids`},
		{"negative uid", "rules:\n  - name: a\n    severity: low\n    process: {name: sshd, uid_not_in: [-1]}\n", `f.yaml:4: process: uid_not_in: "-1" is not a uid`},
		{"duplicate names", "rules:\n  - name: a\n    severity: low\n    process: {name: x}\n  - name: a\n    severity: high\n    module: {name: y}\n", `f.yaml:5: rule "a": name already used by the rule at line 2`},
		{"bad duration", "scan:\n  interval: 5s\n  max_cpu: 5 seconds\n", `f.yaml:3: scan: max_cpu: "5 seconds" is not a duration`},
		{"duration without unit", "scan:\n  interval: 5\n", `f.yaml:2: scan: interval: 5 has no unit`},
		{"zero interval", "scan:\n  interval: 0s\n", `f.yaml:2: scan: interval: 0s: want a positive duration`},
		{"bad jitter", "scan:\n  jitter: 1.5\n", `f.yaml:2: scan: jitter: 1.5: want 0 to below 1`},
		{"bad max_bytes", "scan:\n  max_bytes: lots\n", `f.yaml:2: scan: max_bytes: want a number of bytes`},
		{"unknown scan key", "scan:\n  intervall: 5s\n", `f.yaml:2: unknown key "intervall" in scan:`},
		{"no matcher", "rules:\n  - name: a\n    severity: low\n", `f.yaml:2: rule "a": nothing to match`},
		{"two matchers", "rules:\n  - name: a\n    severity: low\n    process: {name: x}\n    module: {name: y}\n", `f.yaml:5: module: this rule already matches process: (at line 4)`},
		{"bad kind", "rules:\n  - name: a\n    severity: low\n    integrity: {kinds: [table, sys_call]}\n", `f.yaml:4: integrity: kinds: unknown kind "sys_call"`},
		{"bad bool", "rules:\n  - name: a\n    severity: low\n    cred_change: {to_root: yes please}\n", `f.yaml:4: cred_change: to_root: want true or false`},
		{"hidden nothing", "rules:\n  - name: a\n    severity: low\n    hidden: {processes: false}\n", `f.yaml:4: hidden: want processes: true and/or modules: true`},
		{"process without name", "rules:\n  - name: a\n    severity: low\n    process: {uid_not_in: [0]}\n", `f.yaml:4: process: want name: or path:`},
		{"key twice", "rules:\n  - name: a\n    severity: low\n    severity: high\n", `f.yaml:4: severity: given twice (first at line 3)`},
		{"rules not a list", "rules: {name: a}\n", `f.yaml:1: rules: want a list of rules`},
		{"a rule not a mapping", "rules:\n  - no miners\n", `f.yaml:2: a rule is a mapping`},
		{"empty file", "", `f.yaml:1: empty rule file`},
		{"comments only", "# nothing\n", `f.yaml:1: empty rule file`},
		{"two documents", "rules: []\n---\nrules: []\n", `f.yaml:2: a rule file is one YAML document`},
		{"bad yaml", "rules:\n  - name: a\n    severity: low\n   process: {name: x}\n", `f.yaml:4: `},
		{"unclosed flow", "rules:\n  - name: a\n    severity: low\n    process: {name: x\n", `f.yaml:`},
	} {
		_, err := Parse([]byte(tc.text), "f.yaml")
		if err == nil {
			t.Errorf("%s: no error", tc.name)
			continue
		}
		var e *Error
		if !errors.As(err, &e) || e.Line < 1 {
			t.Errorf("%s: %T %v: want an *Error with a line", tc.name, err, err)
		}
		if msg := err.Error(); !strings.HasPrefix(msg, tc.want) || strings.Contains(msg, "\n") {
			t.Errorf("%s:\n got %q\nwant %q...", tc.name, msg, tc.want)
		}
	}
}

func TestLoad(t *testing.T) {
	p := filepath.Join(t.TempDir(), "r.yaml")
	if err := os.WriteFile(p, []byte(docExample), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := Load(p)
	if err != nil || s.Source != p || len(s.Rules) != 2 {
		t.Fatalf("Load: %v, %+v", err, s)
	}
	if _, err := Load(p + ".missing"); err == nil || !strings.HasPrefix(err.Error(), p+".missing: cannot read: ") {
		t.Errorf("Load of a missing file: %v", err)
	}
}

func TestSeverityText(t *testing.T) {
	for s := Info; s <= Critical; s++ {
		b, err := s.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		var back Severity
		if err := back.UnmarshalText(b); err != nil || back != s || s.String() != string(b) {
			t.Errorf("%v: %q %v %v", s, b, back, err)
		}
	}
	if !(Info < Low && Low < Medium && Medium < High && High < Critical) {
		t.Error("severities out of order")
	}
	if _, err := Severity(9).MarshalText(); err == nil {
		t.Error("Severity(9) marshals")
	}
	var s Severity
	if err := s.UnmarshalText([]byte("severe")); err == nil {
		t.Error("severe parses")
	}
}

// TestSyntaxErrorLine: YAML that does not parse is reported at the line
// that broke it, not where yaml.v3 says its block started, and quickly in
// a long file.
func TestSyntaxErrorLine(t *testing.T) {
	var long strings.Builder
	long.WriteString("rules:\n")
	for i := 0; i < 1500; i++ {
		fmt.Fprintf(&long, "  - name: r%d\n    severity: low\n    process: {name: x}\n", i)
	}
	long.WriteString("   severity: high\n")
	for i := 0; i < 100; i++ {
		fmt.Fprintf(&long, "  - name: s%d\n    severity: low\n    process: {name: x}\n", i)
	}
	for _, tc := range []struct {
		name, text string
		line       int
	}{
		{"indentation", "rules:\n  - name: a\n    severity: low\n    process: {name: x}\n  - name: b\n    severity: low\n   process: {name: y}\n", 7},
		{"mapping in a value", "rules:\n  - name: a\n    severity: low: high\n", 3},
		{"tab", "rules:\n  - name: a\n\tseverity: low\n", 3},
		{"long file", long.String(), 4502},
	} {
		_, err := Parse([]byte(tc.text), "f.yaml")
		var e *Error
		if !errors.As(err, &e) || e.Line != tc.line {
			t.Errorf("%s: %v; want line %d", tc.name, err, tc.line)
		}
	}
}
