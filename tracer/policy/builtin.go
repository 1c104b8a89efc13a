package policy

import (
	_ "embed"
	"fmt"
)

// builtin is the shipped default policy (docs/policy.md says how it was
// derived).
//
//go:embed default.yaml
var builtin []byte

// BuiltinText is the shipped default policy's file.
func BuiltinText() []byte { return append([]byte(nil), builtin...) }

// Builtin is the shipped default policy, parsed.
func Builtin() *Policy {
	p, err := Parse("default", builtin)
	if err != nil {
		// TestBuiltin parses it: this is a build defect.
		panic(fmt.Sprintf("the shipped default policy does not parse: %v", err))
	}
	return p
}

// Named loads the policy a flag or config names: "" is none (nil),
// "default" the shipped policy, anything else a file.
func Named(name string) (*Policy, error) {
	switch name {
	case "":
		return nil, nil
	case "default":
		return Builtin(), nil
	}
	return Load(name)
}
