package policy

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/kvmscope/kvmscope/tracer/ioctl"
)

// Op is a comparison of a condition.
type Op string

const (
	OpEq    Op = "=="
	OpNe    Op = "!="
	OpLt    Op = "<"
	OpLe    Op = "<="
	OpGt    Op = ">"
	OpGe    Op = ">="
	OpIn    Op = "in"
	OpNotIn Op = "not in"
	OpMask  Op = "&" // any of the value's bits set
)

// Cond is one entry of match:, "FIELD OP VALUE".
type Cond struct {
	Field  string
	Op     Op
	Values []uint64 // one value, or the list of in / not in
	Text   string   // as written, for events
	// Line and Column locate the condition in its file.
	Line, Column int
}

// holds evaluates the condition on the field's values. A list field
// (several values, such as the MSR indices of KVM_SET_MSRS) satisfies it
// when any of its values does: "index == 0xc0000082" matches a call that
// sets LSTAR among others, and "index not in [...]" one that sets anything
// outside the list.
func (c *Cond) holds(vals []uint64) bool {
	for _, v := range vals {
		if c.holdsFor(v) {
			return true
		}
	}
	return false
}

func (c *Cond) holdsFor(v uint64) bool {
	w := c.Values[0]
	switch c.Op {
	case OpEq:
		return v == w
	case OpNe:
		return v != w
	case OpLt:
		return v < w
	case OpLe:
		return v <= w
	case OpGt:
		return v > w
	case OpGe:
		return v >= w
	case OpMask:
		return v&w != 0
	case OpIn, OpNotIn:
		in := false
		for _, x := range c.Values {
			if v == x {
				in = true
				break
			}
		}
		return in == (c.Op == OpIn)
	}
	return false
}

// parseCond parses "FIELD OP VALUE" for a rule on requests reqs (nil: any
// request, where only "arg" exists). Symbolic values (KVM_CAP_*, ...) are
// those the field declares in the catalogue.
func parseCond(s string, reqs []*ioctl.Request, any bool) (*Cond, error) {
	s = strings.TrimSpace(s)
	c := &Cond{Text: s}
	i := 0
	for i < len(s) && isIdent(s[i]) {
		i++
	}
	if i == 0 {
		return nil, fmt.Errorf("condition %q: want FIELD OP VALUE, e.g. \"vcpu_id >= 2\"", s)
	}
	c.Field, s = s[:i], strings.TrimSpace(s[i:])
	names, err := fieldNames(c.Field, reqs, any)
	if err != nil {
		return nil, err
	}
	switch {
	case strings.HasPrefix(s, "not in") && (len(s) == 6 || !isIdent(s[6])):
		c.Op, s = OpNotIn, s[6:]
	case strings.HasPrefix(s, "in") && (len(s) == 2 || !isIdent(s[2])):
		c.Op, s = OpIn, s[2:]
	default:
		for _, op := range []Op{OpEq, OpNe, OpLe, OpGe, OpLt, OpGt, OpMask} {
			if strings.HasPrefix(s, string(op)) {
				c.Op, s = op, s[len(op):]
				break
			}
		}
	}
	if c.Op == "" {
		return nil, fmt.Errorf("condition %q: unknown operator (want ==, !=, <, <=, >, >=, in [...], not in [...] or &)", c.Text)
	}
	s = strings.TrimSpace(s)
	if c.Op == OpIn || c.Op == OpNotIn {
		if !strings.HasPrefix(s, "[") || !strings.HasSuffix(s, "]") {
			return nil, fmt.Errorf("condition %q: %s takes a list, e.g. [1, 2]", c.Text, c.Op)
		}
		for _, f := range strings.Split(s[1:len(s)-1], ",") {
			v, err := parseValue(strings.TrimSpace(f), names)
			if err != nil {
				return nil, fmt.Errorf("condition %q: %v", c.Text, err)
			}
			c.Values = append(c.Values, v)
		}
		return c, nil
	}
	v, err := parseValue(s, names)
	if err != nil {
		return nil, fmt.Errorf("condition %q: %v", c.Text, err)
	}
	c.Values = []uint64{v}
	return c, nil
}

// fieldNames checks that every request of the rule has the field and
// returns the symbolic values it accepts.
func fieldNames(field string, reqs []*ioctl.Request, any bool) (map[string]uint64, error) {
	if field == "arg" {
		return nil, nil
	}
	if any {
		return nil, fmt.Errorf("field %q: a rule for every request can only test \"arg\"; name the ioctl", field)
	}
	var names map[string]uint64
	for _, r := range reqs {
		f := lookupField(r, field)
		if f == nil {
			name := "this request"
			if r != nil {
				name = r.Name
			}
			return nil, fmt.Errorf("field %q: %s has no such field (%s)", field, name, fieldList(r))
		}
		if names == nil {
			names = f.Names
		}
	}
	return names, nil
}

func lookupField(r *ioctl.Request, name string) *ioctl.Field {
	if r == nil {
		return nil
	}
	for i := range r.Fields {
		if r.Fields[i].Name == name {
			return &r.Fields[i]
		}
	}
	return nil
}

func fieldList(r *ioctl.Request) string {
	l := []string{"arg"}
	if r != nil {
		for _, f := range r.Fields {
			l = append(l, f.Name)
		}
	}
	return "fields: " + strings.Join(l, ", ")
}

// parseValue reads a number (decimal, 0x hex, 0o octal, 0b binary) or
// one of the field's symbolic names.
func parseValue(s string, names map[string]uint64) (uint64, error) {
	if s == "" {
		return 0, fmt.Errorf("missing value")
	}
	if v, ok := names[s]; ok {
		return v, nil
	}
	v, err := strconv.ParseUint(s, 0, 64)
	if err != nil {
		if isIdent(s[0]) && (s[0] < '0' || s[0] > '9') {
			return 0, fmt.Errorf("unknown name %q for this field", s)
		}
		return 0, fmt.Errorf("bad number %q", s)
	}
	return v, nil
}

func isIdent(b byte) bool {
	return b == '_' || b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9'
}
