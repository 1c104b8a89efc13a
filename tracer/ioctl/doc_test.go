package ioctl

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite docs/ioctl-fields.md from the catalogue")

const fieldsDoc = "../../docs/ioctl-fields.md"

// fieldsMarkdown is docs/ioctl-fields.md: the catalogue as a reader needs
// it to write match: conditions.
func fieldsMarkdown() string {
	var b strings.Builder
	b.WriteString(`# ioctl requests and their fields

Generated from kvmscope's catalogue (tracer/ioctl) by
` + "`go test ./tracer/ioctl -run TestFieldsDoc -update`" + `; do not edit.
[policy.md](policy.md) says how to use them in ` + "`match:`" + ` conditions.

Every request has the field ` + "`arg`" + `, the raw third argument of ioctl(2).
A request listed without fields has only ` + "`arg`" + `. "pointer" means the
fields are read from the structure ` + "`arg`" + ` points to, in QEMU's memory (and
QEMU is frozen while they are read: policy.md, "Arguments that change under
us"); "value" means they are ` + "`arg`" + ` itself. A list field holds one value per
entry, and a condition on it holds when it holds for any entry.

| request | number | fd | fields |
|---|---|---|---|
`)
	for _, r := range All() {
		fd := string(r.FD)
		if fd == "" {
			fd = "any"
		}
		var fields []string
		for _, f := range r.Fields {
			fields = append(fields, "`"+f.Name+"`")
		}
		how := ""
		if len(r.Fields) > 0 {
			how = "value: "
			if r.Pointer {
				how = "pointer: "
			}
		}
		fmt.Fprintf(&b, "| `%s` | `%#x` | %s | %s%s |\n", r.Name, r.Cmd, fd, how, strings.Join(fields, ", "))
	}
	b.WriteString("\n## The fields\n")
	for _, r := range All() {
		if len(r.Fields) == 0 {
			continue
		}
		fmt.Fprintf(&b, "\n### %s\n\n", r.Name)
		for _, f := range r.Fields {
			list := ""
			if f.List {
				list = " (list)"
			}
			fmt.Fprintf(&b, "- `%s`%s: %s", f.Name, list, f.Doc)
			if len(f.Names) > 0 {
				fmt.Fprintf(&b, ". Names: %s", names(f.Names))
			}
			b.WriteString("\n")
		}
	}
	return b.String()
}

// names lists a field's symbolic values; the KVM_CAP_* list is long, so
// it is given once, at the end.
func names(m map[string]uint64) string {
	if len(m) > 20 {
		return "the `KVM_CAP_*` constants (below)"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return m[keys[i]] < m[keys[j]] || m[keys[i]] == m[keys[j]] && keys[i] < keys[j] })
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = fmt.Sprintf("`%s` (%#x)", k, m[k])
	}
	return strings.Join(out, ", ")
}

func capsMarkdown() string {
	keys := make([]string, 0, len(capNames))
	for k := range capNames {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		return capNames[keys[i]] < capNames[keys[j]] || capNames[keys[i]] == capNames[keys[j]] && keys[i] < keys[j]
	})
	var b strings.Builder
	b.WriteString("\n## KVM_CAP_* names\n\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "- `%s` = %d\n", k, capNames[k])
	}
	return b.String()
}

func TestFieldsDoc(t *testing.T) {
	want := fieldsMarkdown() + capsMarkdown()
	if *update {
		if err := os.WriteFile(fieldsDoc, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(fieldsDoc)
	if err != nil || string(got) != want {
		t.Errorf("docs/ioctl-fields.md is stale: go test ./tracer/ioctl -run TestFieldsDoc -update")
	}
}
