package rules

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kvmscope/kvmscope/internal/yamlfile"
	"gopkg.in/yaml.v3"
)

// Error is a problem in a rule file, at a line (1 or more). Its text is
// one line, "FILE:LINE: message".
type Error struct {
	File string
	Line int
	Msg  string
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
}

// Set is a parsed rule file. It is not changed after Parse: Evaluate may
// run from many goroutines at once.
type Set struct {
	Rules []Rule
	// Scan is the file's scan: section, nil when it has none.
	Scan *ScanSection
	// Source is the file's name, as given to Parse or Load.
	Source string
}

// Rule is one rule of a file. Exactly one matcher (process, cred_change,
// parent_change, module, integrity or hidden) says what it matches.
type Rule struct {
	Name     string
	Severity Severity
	// Line is where the rule starts in its file.
	Line int

	process   *processMatch
	cred      *credMatch
	parent    *parentMatch
	module    *moduleMatch
	integrity *integrityMatch
	hidden    *hiddenMatch
}

// Matcher is the rule's matcher key: process, cred_change, parent_change,
// module, integrity or hidden.
func (r *Rule) Matcher() string {
	switch {
	case r.process != nil:
		return "process"
	case r.cred != nil:
		return "cred_change"
	case r.parent != nil:
		return "parent_change"
	case r.module != nil:
		return "module"
	case r.integrity != nil:
		return "integrity"
	case r.hidden != nil:
		return "hidden"
	}
	return ""
}

// ScanSection is a file's scan: section, for the scan policy. A nil
// field was not given (the policy's own value stands).
type ScanSection struct {
	Interval *time.Duration // > 0
	Jitter   *float64       // 0 to below 1
	MaxCPU   *time.Duration // >= 0; 0 is no bound
	MaxBytes *int64         // >= 0; 0 is no bound
	MaxDuty  *float64       // 0 to 1; 0 is no bound
	BusyLoad *float64       // >= 0; 0 is never
}

type processMatch struct {
	names, paths []string // globs; either may be empty, not both
	uidNotIn     []int
	hasUIDs      bool // uid_not_in given (an empty list: every uid)
}

type credMatch struct{ toRoot bool }

type parentMatch struct{ orphans bool }

type moduleMatch struct {
	names    []string // deny: matches these (all when empty)
	notIn    []string // allow-list: matches modules not on it
	hasNotIn bool
}

type integrityMatch struct{ kinds map[string]bool }

type hiddenMatch struct{ processes, modules bool }

// IntegrityKinds are the kinds of introspect.Deviation a rule can name.
// runtime_patch is the kernel's own text patching (ftrace and the like):
// an integrity rule matches it only when it lists it.
var IntegrityKinds = []string{"table", "code", "call_target", "idt", "cpu", "msr", "runtime_patch"}

// Load reads and parses the rule file at path.
func Load(path string) (*Set, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return nil, fmt.Errorf("%s: cannot read: %v", path, err)
	}
	return Parse(b, path)
}

// Parse reads a rule file; name is its file, for messages. Every error is
// an *Error, one line "NAME:LINE: message". Unknown keys are errors (a
// typo must not disable a rule silently), as are duplicate rule names;
// an empty rules list is valid, an empty file is not.
func Parse(data []byte, name string) (*Set, error) {
	p := &parser{name: name}
	set, err := p.parse(data)
	if err != nil {
		return nil, err
	}
	return set, nil
}

type parser struct{ name string }

func (p *parser) fail(n *yaml.Node, format string, a ...any) error {
	line := 1
	if n != nil && n.Line > 0 {
		line = n.Line
	}
	return &Error{File: p.name, Line: line, Msg: oneLine(fmt.Sprintf(format, a...))}
}

func (p *parser) parse(data []byte) (set *Set, err error) {
	// yaml.v3 is not known to panic on any input, but a rule file is
	// user input and a reload must never take the process down.
	defer func() {
		if r := recover(); r != nil {
			set, err = nil, &Error{File: p.name, Line: 1, Msg: fmt.Sprintf("cannot parse: %v", oneLine(fmt.Sprint(r)))}
		}
	}()
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, p.fail(nil, "empty rule file (want rules:, a list of rules; rules: [] for none)")
		}
		return nil, p.syntaxError(data, err)
	}
	var more yaml.Node
	if err := dec.Decode(&more); err == nil {
		return nil, p.fail(&more, "a rule file is one YAML document; this is a second")
	} else if !errors.Is(err, io.EOF) {
		return nil, p.syntaxError(data, err)
	}
	set = &Set{Source: p.name, Rules: []Rule{}}
	if len(doc.Content) == 0 {
		return nil, p.fail(&doc, "empty rule file (want rules:, a list of rules; rules: [] for none)")
	}
	top := deref(doc.Content[0])
	if top.Kind == yaml.ScalarNode && top.ShortTag() == "!!null" {
		return nil, p.fail(top, "empty rule file (want rules:, a list of rules; rules: [] for none)")
	}
	err = p.mapping(top, "a rule file is a mapping with rules: and scan:", func(k, v *yaml.Node) error {
		switch k.Value {
		case "rules":
			return p.rules(v, set)
		case "scan":
			s, err := p.scan(v)
			set.Scan = s
			return err
		}
		return p.fail(k, "unknown key %q (want rules or scan)", k.Value)
	})
	if err != nil {
		return nil, err
	}
	return set, nil
}

func (p *parser) rules(v *yaml.Node, set *Set) error {
	if isNull(v) {
		return nil
	}
	if v.Kind != yaml.SequenceNode {
		return p.fail(v, "rules: want a list of rules")
	}
	names := map[string]int{}
	for _, rn := range v.Content {
		r, nameNode, err := p.rule(deref(rn))
		if err != nil {
			return err
		}
		if first, ok := names[r.Name]; ok {
			return p.fail(nameNode, "rule %q: name already used by the rule at line %d", r.Name, first)
		}
		names[r.Name] = r.Line
		set.Rules = append(set.Rules, r)
	}
	return nil
}

const ruleKeys = "name, severity, and one of process, cred_change, parent_change, module, integrity, hidden"

func (p *parser) rule(n *yaml.Node) (Rule, *yaml.Node, error) {
	r := Rule{Line: n.Line}
	var nameNode, matcherKey *yaml.Node
	hasSeverity := false
	err := p.mapping(n, "a rule is a mapping with "+ruleKeys, func(k, v *yaml.Node) error {
		switch k.Value {
		case "name":
			if v.Kind != yaml.ScalarNode || isNull(v) || strings.TrimSpace(v.Value) == "" {
				return p.fail(v, "name: want the rule's name, a non-empty string")
			}
			r.Name, nameNode = v.Value, k
			return nil
		case "severity":
			s, err := ParseSeverity(yamlfile.Scalar(v))
			if err != nil || v.Kind != yaml.ScalarNode {
				return p.fail(v, "severity: %s", yamlfile.ErrOr(err, "want info, low, medium, high or critical"))
			}
			r.Severity, hasSeverity = s, true
			return nil
		case "process", "cred_change", "parent_change", "module", "integrity", "hidden":
			if matcherKey != nil {
				return p.fail(k, "%s: this rule already matches %s: (at line %d); a rule matches one thing, write two rules", k.Value, matcherKey.Value, matcherKey.Line)
			}
			matcherKey = k
			return p.matcher(&r, k.Value, v)
		}
		return p.fail(k, "unknown key %q in a rule (want %s)", k.Value, ruleKeys)
	})
	if err != nil {
		return r, nil, err
	}
	if r.Name == "" {
		return r, nil, p.fail(n, "rule at line %d: name: missing", n.Line)
	}
	if !hasSeverity {
		return r, nil, p.fail(n, "rule %q: severity: missing (info, low, medium, high or critical)", r.Name)
	}
	if matcherKey == nil {
		return r, nil, p.fail(n, "rule %q: nothing to match (want one of process, cred_change, parent_change, module, integrity, hidden)", r.Name)
	}
	return r, nameNode, nil
}

func (p *parser) matcher(r *Rule, key string, v *yaml.Node) error {
	switch key {
	case "process":
		m := &processMatch{}
		err := p.mapping(v, "process: want a mapping with name:, path: and uid_not_in:", func(k, v *yaml.Node) error {
			var err error
			switch k.Value {
			case "name":
				m.names, err = p.strings(v, "process: name")
			case "path":
				m.paths, err = p.strings(v, "process: path")
			case "uid_not_in":
				m.uidNotIn, err = p.uids(v)
				m.hasUIDs = true
			default:
				err = p.fail(k, "unknown key %q in process: (want name, path, uid_not_in)", k.Value)
			}
			return err
		})
		if err != nil {
			return err
		}
		if len(m.names) == 0 && len(m.paths) == 0 {
			return p.fail(v, "process: want name: or path: (what must not run)")
		}
		r.process = m
	case "cred_change":
		m := &credMatch{}
		err := p.mapping(v, "cred_change: want a mapping such as {to_root: true}", func(k, v *yaml.Node) error {
			if k.Value != "to_root" {
				return p.fail(k, "unknown key %q in cred_change: (want to_root)", k.Value)
			}
			b, err := p.bool(v, "cred_change: to_root")
			m.toRoot = b
			return err
		})
		if err != nil {
			return err
		}
		r.cred = m
	case "parent_change":
		m := &parentMatch{}
		if v.Kind == yaml.ScalarNode {
			b, err := p.bool(v, "parent_change")
			if err != nil {
				return err
			}
			if !b {
				return p.fail(v, "parent_change: false matches nothing (remove the rule)")
			}
			r.parent = m
			return nil
		}
		err := p.mapping(v, "parent_change: want true, or a mapping such as {orphans: true}", func(k, v *yaml.Node) error {
			if k.Value != "orphans" {
				return p.fail(k, "unknown key %q in parent_change: (want orphans)", k.Value)
			}
			b, err := p.bool(v, "parent_change: orphans")
			m.orphans = b
			return err
		})
		if err != nil {
			return err
		}
		r.parent = m
	case "module":
		m := &moduleMatch{}
		err := p.mapping(v, "module: want a mapping with not_in: and/or name:", func(k, v *yaml.Node) error {
			var err error
			switch k.Value {
			case "name":
				m.names, err = p.strings(v, "module: name")
			case "not_in":
				if isNull(v) || (v.Kind == yaml.SequenceNode && len(v.Content) == 0) {
					m.hasNotIn = true
					return nil // an empty allow-list: every module
				}
				m.notIn, err = p.strings(v, "module: not_in")
				m.hasNotIn = true
			default:
				err = p.fail(k, "unknown key %q in module: (want name, not_in)", k.Value)
			}
			return err
		})
		if err != nil {
			return err
		}
		if len(m.names) == 0 && !m.hasNotIn {
			return p.fail(v, "module: want not_in: (the modules allowed) or name: (modules denied)")
		}
		r.module = m
	case "integrity":
		m := &integrityMatch{kinds: map[string]bool{}}
		hasKinds := false
		err := p.mapping(v, "integrity: want a mapping such as {kinds: [table, code, call_target, idt]}", func(k, v *yaml.Node) error {
			if k.Value != "kinds" {
				return p.fail(k, "unknown key %q in integrity: (want kinds)", k.Value)
			}
			hasKinds = true
			items, err := p.items(v, "integrity: kinds")
			if err != nil {
				return err
			}
			for _, it := range items {
				if !slices.Contains(IntegrityKinds, it.Value) {
					return p.fail(it, "integrity: kinds: unknown kind %q (want %s)", it.Value, strings.Join(IntegrityKinds, ", "))
				}
				m.kinds[it.Value] = true
			}
			return nil
		})
		if err != nil {
			return err
		}
		if !hasKinds {
			for _, k := range IntegrityKinds {
				m.kinds[k] = k != "runtime_patch"
			}
		}
		r.integrity = m
	case "hidden":
		m := &hiddenMatch{}
		err := p.mapping(v, "hidden: want a mapping such as {processes: true, modules: true}", func(k, v *yaml.Node) error {
			var err error
			switch k.Value {
			case "processes":
				m.processes, err = p.bool(v, "hidden: processes")
			case "modules":
				m.modules, err = p.bool(v, "hidden: modules")
			default:
				err = p.fail(k, "unknown key %q in hidden: (want processes, modules)", k.Value)
			}
			return err
		})
		if err != nil {
			return err
		}
		if !m.processes && !m.modules {
			return p.fail(v, "hidden: want processes: true and/or modules: true")
		}
		r.hidden = m
	}
	return nil
}

const scanKeys = "interval, jitter, max_cpu, max_bytes, max_duty, busy_load"

func (p *parser) scan(v *yaml.Node) (*ScanSection, error) {
	s := &ScanSection{}
	if isNull(v) {
		return s, nil
	}
	err := p.mapping(v, "scan: want a mapping with "+scanKeys, func(k, v *yaml.Node) error {
		switch k.Value {
		case "interval", "max_cpu":
			d, err := p.duration(v, k.Value)
			if err != nil {
				return err
			}
			if k.Value == "interval" {
				if d <= 0 {
					return p.fail(v, "scan: interval: %s: want a positive duration", v.Value)
				}
				s.Interval = &d
			} else {
				s.MaxCPU = &d
			}
		case "jitter", "max_duty", "busy_load":
			f, err := p.number(v, k.Value)
			if err != nil {
				return err
			}
			switch {
			case k.Value == "jitter" && (f < 0 || f >= 1):
				return p.fail(v, "scan: jitter: %s: want 0 to below 1", v.Value)
			case k.Value == "max_duty" && (f < 0 || f > 1):
				return p.fail(v, "scan: max_duty: %s: want 0 to 1 (a share of one core; 0 is no bound)", v.Value)
			case k.Value == "busy_load" && f < 0:
				return p.fail(v, "scan: busy_load: %s: want 0 or more (load average per CPU; 0 is never)", v.Value)
			}
			switch k.Value {
			case "jitter":
				s.Jitter = &f
			case "max_duty":
				s.MaxDuty = &f
			default:
				s.BusyLoad = &f
			}
		case "max_bytes":
			b, err := p.size(v)
			if err != nil {
				return err
			}
			s.MaxBytes = &b
		default:
			return p.fail(k, "unknown key %q in scan: (want %s)", k.Value, scanKeys)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (p *parser) duration(v *yaml.Node, key string) (time.Duration, error) {
	if v.Kind != yaml.ScalarNode || isNull(v) {
		return 0, p.fail(v, "scan: %s: want a duration such as 5s or 200ms", key)
	}
	d, err := time.ParseDuration(v.Value)
	if err != nil {
		if v.ShortTag() == "!!int" || v.ShortTag() == "!!float" {
			return 0, p.fail(v, "scan: %s: %s has no unit (want a duration such as 5s or 200ms)", key, v.Value)
		}
		return 0, p.fail(v, "scan: %s: %q is not a duration (want one such as 5s or 200ms)", key, v.Value)
	}
	if d < 0 {
		return 0, p.fail(v, "scan: %s: %s: cannot be negative", key, v.Value)
	}
	return d, nil
}

func (p *parser) number(v *yaml.Node, key string) (float64, error) {
	if v.Kind == yaml.ScalarNode && (v.ShortTag() == "!!int" || v.ShortTag() == "!!float") {
		f, err := strconv.ParseFloat(strings.ReplaceAll(v.Value, "_", ""), 64)
		if err == nil && !math.IsNaN(f) && !math.IsInf(f, 0) {
			return f, nil
		}
	}
	return 0, p.fail(v, "scan: %s: want a number", key)
}

var sizeUnits = []struct {
	suffix string
	mult   int64
}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1}}

// size reads max_bytes: a number of bytes, or one with a unit (64MiB).
func (p *parser) size(v *yaml.Node) (int64, error) {
	bad := func() (int64, error) {
		return 0, p.fail(v, "scan: max_bytes: want a number of bytes, 0 or more (or with a unit: 64MiB, 1GiB, 500MB)")
	}
	if v.Kind != yaml.ScalarNode || isNull(v) {
		return bad()
	}
	s, mult := strings.TrimSpace(v.Value), int64(1)
	for _, u := range sizeUnits {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = strings.TrimSpace(n), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(strings.ReplaceAll(s, "_", ""), 10, 64)
	if err != nil || n < 0 || n > math.MaxInt64/mult {
		return bad()
	}
	return n * mult, nil
}

func (p *parser) bool(v *yaml.Node, key string) (bool, error) {
	if v.Kind == yaml.ScalarNode && v.ShortTag() == "!!bool" {
		if b, err := strconv.ParseBool(strings.ToLower(v.Value)); err == nil {
			return b, nil
		}
	}
	return false, p.fail(v, "%s: want true or false", key)
}

// items is a scalar or a list of scalars (one level; aliases resolved).
func (p *parser) items(v *yaml.Node, key string) ([]*yaml.Node, error) {
	list := []*yaml.Node{v}
	if v.Kind == yaml.SequenceNode {
		list = v.Content
	}
	out := make([]*yaml.Node, 0, len(list))
	for _, it := range list {
		it = deref(it)
		if it.Kind != yaml.ScalarNode || isNull(it) || it.Value == "" {
			return nil, p.fail(it, "%s: want a name or a list of names", key)
		}
		out = append(out, it)
	}
	if len(out) == 0 {
		return nil, p.fail(v, "%s: empty list", key)
	}
	return out, nil
}

func (p *parser) strings(v *yaml.Node, key string) ([]string, error) {
	items, err := p.items(v, key)
	if err != nil {
		return nil, err
	}
	out := make([]string, len(items))
	for i, it := range items {
		out[i] = it.Value
	}
	return out, nil
}

func (p *parser) uids(v *yaml.Node) ([]int, error) {
	if v.Kind == yaml.SequenceNode && len(v.Content) == 0 {
		return []int{}, nil
	}
	if isNull(v) || v.Kind == yaml.MappingNode {
		return nil, p.fail(v, "process: uid_not_in: want a list of uids, such as [0, 1000]")
	}
	list := []*yaml.Node{v}
	if v.Kind == yaml.SequenceNode {
		list = v.Content
	}
	var out []int
	for _, it := range list {
		it = deref(it)
		if it.Kind == yaml.ScalarNode && it.ShortTag() == "!!int" {
			n, err := strconv.ParseInt(strings.ReplaceAll(it.Value, "_", ""), 0, 64)
			if err == nil && n >= 0 && n <= math.MaxUint32 {
				out = append(out, int(n))
				continue
			}
		}
		what := "this"
		if it.Kind == yaml.ScalarNode {
			what = strconv.Quote(it.Value)
		}
		return nil, p.fail(it, "process: uid_not_in: %s is not a uid (want numbers, such as [0, 1000])", what)
	}
	return out, nil
}

// mapping calls each for every key and value of the mapping n, in order;
// a key given twice is an error.
func (p *parser) mapping(n *yaml.Node, want string, each func(k, v *yaml.Node) error) error {
	n = deref(n)
	if n.Kind != yaml.MappingNode {
		return p.fail(n, "%s", want)
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := deref(n.Content[i]), deref(n.Content[i+1])
		if k.Kind != yaml.ScalarNode {
			return p.fail(k, "a key must be a plain name")
		}
		if k.Value == "<<" {
			return p.fail(k, "merge keys (<<) are not supported here")
		}
		if line, ok := seen[k.Value]; ok {
			return p.fail(k, "%s: given twice (first at line %d)", k.Value, line)
		}
		seen[k.Value] = k.Line
		if err := each(k, v); err != nil {
			return err
		}
	}
	return nil
}

// deref follows aliases to the node they name.
func deref(n *yaml.Node) *yaml.Node {
	for i := 0; n != nil && n.Kind == yaml.AliasNode && n.Alias != nil && i < 64; i++ {
		n = n.Alias
	}
	if n == nil {
		return &yaml.Node{}
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == 0 || (n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null")
}

// oneLine keeps a message to one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}

// syntaxError turns a yaml.v3 syntax error into an *Error at the line
// that broke the file (yamlfile.SyntaxLine).
func (p *parser) syntaxError(data []byte, err error) error {
	line, msg := yamlfile.Split(err)
	return &Error{File: p.name, Line: yamlfile.SyntaxLine(data, line, msg), Msg: oneLine(yamlfile.Hint(msg))}
}
