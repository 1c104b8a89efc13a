package rules

import "testing"

func TestBuiltin(t *testing.T) {
	s := Builtin()
	if len(s.Rules) != 3 || s.Source != BuiltinName {
		t.Fatalf("built-in rules: %+v", s)
	}
	for _, r := range s.Rules {
		if r.Severity != Critical {
			t.Errorf("%s: severity %v", r.Name, r.Severity)
		}
	}
}
