package rules

import (
	"regexp"
	"strings"
	"testing"

	"github.com/kvmscope/kvmscope/introspect"
)

var errLine = regexp.MustCompile(`^fuzz\.yaml:[1-9][0-9]*: \S`)

// FuzzParse: a rule file is user input, reloaded while the VM runs:
// whatever it holds, Parse returns a set or one line "fuzz.yaml:LINE: ...",
// and never panics; a set it returns evaluates.
func FuzzParse(f *testing.F) {
	f.Add([]byte(docExample))
	f.Add([]byte("scan:\n  interval: 5s\n  jitter: 0.1\n  max_bytes: 64MiB\nrules:\n  - {name: r, severity: low, cred_change: {to_root: true}}\n  - {name: p, severity: info, parent_change: true}\n"))
	f.Add([]byte("rules:\n  - &a {name: m, severity: high, module: {not_in: [ext4, \"virtio_*\"]}}\n  - {name: i, severity: critical, integrity: {kinds: [table, idt]}}\n  - {name: h, severity: high, hidden: {processes: true}}\n"))
	f.Add([]byte("rules:\n  - name: a\n    severity: low\n   process: {name: x}\n"))
	sub := Subject{Processes: guestProcesses(), Previous: guestProcesses(), Modules: []introspect.Module{{Name: "ext4"}, {Name: "evil"}},
		Deviations: []introspect.Deviation{{What: "idt[3]", Kind: "idt"}}, HiddenProcesses: []Hidden{{Name: "x", PID: 1}}}
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := Parse(b, "fuzz.yaml")
		if err != nil {
			msg := err.Error()
			if !errLine.MatchString(msg) || strings.Contains(msg, "\n") {
				t.Fatalf("error %q: want one line fuzz.yaml:LINE: message", msg)
			}
			return
		}
		s.Evaluate(sub)
	})
}
