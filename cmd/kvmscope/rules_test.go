package main

import (
	"strings"
	"testing"
)

// The first example of docs/rules.md.
const docRules = `rules:
  - name: no miners
    severity: high
    process: {name: crypto-miner}
  - name: only root runs sshd
    severity: medium
    process: {name: sshd, uid_not_in: [0]}
`

func TestRulesCheck(t *testing.T) {
	good := writeFile(t, "rules.yaml", docRules)
	out, errOut, code := kvmscope(t, "rules", "check", good)
	if code != 0 || out != good+": 2 rules ok\n" || errOut != "" {
		t.Errorf("check good: code %d, out %q, err %q", code, out, errOut)
	}
	if out, errOut, code := kvmscope(t, "rules", "check", "../../examples/rules.yaml"); code != 0 || !strings.HasSuffix(out, " rules ok\n") {
		t.Errorf("check examples/rules.yaml: code %d, out %q, err %q", code, out, errOut)
	}
	for _, tc := range []struct{ name, text, want string }{
		{"bad severity", "rules:\n  - name: a\n    severity: urgent\n    process: {name: x}\n", `:3: severity: unknown severity "urgent"`},
		{"unknown key", "rules:\n  - name: a\n    severity: low\n    process: {name: x, uid: 0}\n", `:4: unknown key "uid" in process:`},
		{"duplicate name", docRules + "  - name: no miners\n    severity: low\n    module: {name: x}\n", `:8: rule "no miners": name already used by the rule at line 2`},
		{"bad duration", "scan:\n  interval: soon\n", `:2: scan: interval: "soon" is not a duration`},
		{"bad yaml", "rules:\n  - name: a\n   severity: low\n", ":3: "},
	} {
		bad := writeFile(t, "bad.yaml", tc.text)
		_, errOut, code := kvmscope(t, "rules", "check", bad)
		if code != 2 || !strings.Contains(errOut, bad+tc.want) || strings.Count(strings.TrimSpace(errOut), "\n") != 0 || strings.Contains(errOut, "goroutine") {
			t.Errorf("%s: code %d, stderr %q; want exit 2 and one line with %q", tc.name, code, errOut, bad+tc.want)
		}
	}
	for _, args := range [][]string{{"rules", "check"}, {"rules", "check", "/nonexistent/rules.yaml"}} {
		_, errOut, code := kvmscope(t, args...)
		if code != 2 || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
			t.Errorf("%v: code %d, stderr %q; want exit 2 and one line", args, code, errOut)
		}
	}
}
