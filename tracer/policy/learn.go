package policy

import (
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/kvmscope/kvmscope/tracer/ioctl"
)

// learnedFields are the fields whose values a learned policy pins: the
// ones that say what a call does (which capability, which device, which
// MSR), not where (addresses and sizes differ between runs).
var learnedFields = map[string][]string{
	"KVM_ENABLE_CAP":      {"cap"},
	"KVM_CHECK_EXTENSION": {"cap"},
	"KVM_CREATE_DEVICE":   {"type"},
	"KVM_SET_MSRS":        {"index"},
	"KVM_SET_GUEST_DEBUG": {"control"},
	"KVM_CREATE_VM":       {"type"},
}

// Learner gathers the calls a VM makes, to write a policy that allows
// exactly those.
type Learner struct {
	seen map[learnKey]map[string]map[uint64]bool // field -> values
}

type learnKey struct {
	cmd uint32
	fd  ioctl.FD
}

// Add records one call: its request, fd kind and decoded fields (nil when
// not decoded). It reports whether the call was new: a request, fd kind
// or field value not seen before.
func (l *Learner) Add(cmd uint32, fd ioctl.FD, args *ioctl.Args) (changed bool) {
	if l.seen == nil {
		l.seen = map[learnKey]map[string]map[uint64]bool{}
	}
	k := learnKey{cmd, fd}
	fields := l.seen[k]
	if fields == nil {
		fields = map[string]map[uint64]bool{}
		l.seen[k] = fields
		changed = true
	}
	req, ok := ioctl.ByCmd(cmd)
	if !ok || args == nil {
		return changed
	}
	for _, f := range learnedFields[req.Name] {
		vals, ok := args.Get(f)
		if !ok {
			continue
		}
		if fields[f] == nil {
			fields[f] = map[uint64]bool{}
		}
		for _, v := range vals {
			if !fields[f][v] {
				fields[f][v] = true
				changed = true
			}
		}
	}
	return changed
}

// WantsArgs reports whether Add needs the decoded fields of cmd.
func WantsArgs(cmd uint32) bool {
	req, ok := ioctl.ByCmd(cmd)
	return ok && learnedFields[req.Name] != nil
}

// Write writes the learned policy: one allow rule per request and fd kind
// seen, pinned to the values seen for the fields of learnedFields, and
// the default unseen for everything else (log, or deny to enforce
// exactly what was seen).
func (l *Learner) Write(w io.Writer, unseen Action, header string) error {
	keys := make([]learnKey, 0, len(l.seen))
	for k := range l.seen {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		ni, nj := ioctl.Name(keys[i].cmd), ioctl.Name(keys[j].cmd)
		if ni != nj {
			return ni < nj
		}
		return keys[i].fd < keys[j].fd
	})
	var b strings.Builder
	for _, line := range strings.Split(strings.TrimSpace(header), "\n") {
		fmt.Fprintf(&b, "# %s\n", line)
	}
	fmt.Fprintf(&b, "default: %s\nrules:\n", unseen)
	for _, k := range keys {
		name := ioctl.Name(k.cmd)
		fd := ""
		if k.fd != ioctl.FDAny {
			fd = fmt.Sprintf("\n    fd: %s", k.fd)
		}
		fields := l.seen[k]
		fnames := make([]string, 0, len(fields))
		for f := range fields {
			fnames = append(fnames, f)
		}
		sort.Strings(fnames)
		var list, single []string
		for _, f := range fnames {
			vals := make([]uint64, 0, len(fields[f]))
			for v := range fields[f] {
				vals = append(vals, v)
			}
			sort.Slice(vals, func(i, j int) bool { return vals[i] < vals[j] })
			s := make([]string, len(vals))
			for i, v := range vals {
				s[i] = formatValue(k.cmd, f, v)
			}
			cond := fmt.Sprintf("%s in [%s]", f, strings.Join(s, ", "))
			if isList(k.cmd, f) {
				list = append(list, strings.Replace(cond, " in [", " not in [", 1))
			} else {
				single = append(single, cond)
			}
		}
		// A list field (MSR indices) allows a call only when every value
		// was seen: an unseen one sends the call to the default first.
		for _, c := range list {
			fmt.Fprintf(&b, "  - ioctl: %s%s\n    match: [%q]\n    action: %s\n", name, fd, c, unseen)
		}
		fmt.Fprintf(&b, "  - ioctl: %s%s\n", name, fd)
		if len(single) > 0 {
			q := make([]string, len(single))
			for i, c := range single {
				q[i] = fmt.Sprintf("%q", c)
			}
			fmt.Fprintf(&b, "    match: [%s]\n", strings.Join(q, ", "))
		}
		fmt.Fprintf(&b, "    action: allow\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func isList(cmd uint32, field string) bool {
	req, _ := ioctl.ByCmd(cmd)
	f := lookupField(req, field)
	return f != nil && f.List
}

// formatValue writes v by its symbolic name where the field has one.
func formatValue(cmd uint32, field string, v uint64) string {
	req, _ := ioctl.ByCmd(cmd)
	if f := lookupField(req, field); f != nil {
		best := ""
		for n, x := range f.Names {
			if x == v && (best == "" || n < best) {
				best = n
			}
		}
		if best != "" {
			return best
		}
	}
	if v < 10 {
		return fmt.Sprint(v)
	}
	return fmt.Sprintf("%#x", v)
}
