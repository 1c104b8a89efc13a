package rules

// builtinYAML is the rule base a VM is judged by when no rule file is
// given: what no clean guest ever shows.
const builtinYAML = `rules:
  - name: hidden process
    severity: critical
    hidden: {processes: true}
  - name: hidden module
    severity: critical
    hidden: {modules: true}
  - name: system-call dispatch tampered
    severity: critical
    integrity: {kinds: [table, code, call_target, idt]}
`

// BuiltinName is the Source of the built-in rule base.
const BuiltinName = "built-in"

// Builtin returns the built-in rule base (hidden processes and modules,
// tampered system-call dispatch).
func Builtin() *Set {
	s, err := Parse([]byte(builtinYAML), BuiltinName)
	if err != nil {
		panic("rules: the built-in rule base does not parse: " + err.Error())
	}
	return s
}
