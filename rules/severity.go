package rules

import (
	"fmt"
	"strings"
)

// Severity ranks a rule's findings: Info < Low < Medium < High < Critical.
// It is written as its lowercase name, in rule files and in JSON.
type Severity int

// The severities, lowest first.
const (
	Info Severity = iota
	Low
	Medium
	High
	Critical
)

var severityNames = [...]string{"info", "low", "medium", "high", "critical"}

func (s Severity) valid() bool { return s >= Info && s <= Critical }

// String is the severity's name: "info" ... "critical".
func (s Severity) String() string {
	if !s.valid() {
		return fmt.Sprintf("Severity(%d)", int(s))
	}
	return severityNames[s]
}

// MarshalText writes the name; a value outside Info..Critical is an error.
func (s Severity) MarshalText() ([]byte, error) {
	if !s.valid() {
		return nil, fmt.Errorf("rules: severity %d out of range", int(s))
	}
	return []byte(severityNames[s]), nil
}

// UnmarshalText reads a name (ParseSeverity).
func (s *Severity) UnmarshalText(b []byte) error {
	v, err := ParseSeverity(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// ParseSeverity reads info, low, medium, high or critical (any case).
func ParseSeverity(name string) (Severity, error) {
	for i, n := range severityNames {
		if strings.EqualFold(name, n) {
			return Severity(i), nil
		}
	}
	return 0, fmt.Errorf("unknown severity %q (want info, low, medium, high or critical)", name)
}
