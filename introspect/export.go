package introspect

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
)

// LibVMI returns a LibVMI configuration block (libvmi.conf) for the guest
// named name, with the offsets LibVMI's Linux support reads
// (libvmi/config/lexicon.l: linux_tasks, linux_mm, linux_pid, linux_pgd,
// linux_name). LibVMI still needs the kernel's System.map or a JSON
// profile for symbol addresses; the block says where the ones kvmscope
// found are, in comments.
func (o *Offsets) LibVMI(k *Kernel, name string) string {
	if name == "" {
		name = "guest"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# Written by kvmscope from guest memory")
	if k != nil && k.Banner != "" {
		fmt.Fprintf(&b, "\n# %s", k.Banner)
	}
	if k != nil {
		fmt.Fprintf(&b, "\n# KASLR shift %#x, kernel physical base %#x", k.KASLRShift, k.PhysBase)
		for _, s := range []string{"init_task", "swapper_pg_dir", "init_top_pgt"} {
			if a, ok := k.Symbol(s); ok {
				fmt.Fprintf(&b, "\n# %s = %#x", s, a)
			}
		}
	}
	fmt.Fprintf(&b, "\n%s {\n    ostype = \"Linux\";\n", name)
	for _, e := range []struct {
		key string
		off Offset
	}{
		{"linux_name", o.TaskComm},
		{"linux_tasks", o.TaskTasks},
		{"linux_mm", o.TaskMM},
		{"linux_pid", o.TaskPID},
		{"linux_pgd", o.MMPgd},
	} {
		if !e.off.Known() {
			fmt.Fprintf(&b, "    # %s unknown\n", e.key)
			continue
		}
		fmt.Fprintf(&b, "    %s = %#x;  # %s\n", e.key, e.off.Value, e.off.Source)
	}
	b.WriteString("}\n")
	return b.String()
}

// offsetsJSON is the --format json document.
type offsetsJSON struct {
	Kernel  *kernelJSON       `json:"kernel,omitempty"`
	Offsets map[string]Offset `json:"offsets"`
	Symbols map[string]string `json:"symbols,omitempty"`
}

type kernelJSON struct {
	Banner     string `json:"banner,omitempty"`
	Version    string `json:"version,omitempty"`
	KASLRShift string `json:"kaslr_shift"`
	PhysBase   string `json:"phys_base"`
	TextVA     string `json:"text_va"`
	BTF        bool   `json:"btf"`
}

// exportedSymbols are the symbol addresses other tools need with the
// offsets.
var exportedSymbols = []string{"init_task", "init_mm", "init_top_pgt", "swapper_pg_dir", "linux_banner", "modules", "_text", "sys_call_table"}

// JSON returns the offsets, each with its source and how it was found,
// and the kernel facts and symbol addresses that go with them.
func (o *Offsets) JSON(k *Kernel) ([]byte, error) {
	doc := offsetsJSON{Offsets: map[string]Offset{}}
	for _, m := range o.Members() {
		if m.Known() {
			doc.Offsets[m.Name] = m.Offset
		}
	}
	if k != nil {
		doc.Kernel = &kernelJSON{
			Banner: k.Banner, KASLRShift: fmt.Sprintf("%#x", k.KASLRShift),
			PhysBase: fmt.Sprintf("%#x", k.PhysBase), TextVA: fmt.Sprintf("%#x", k.TextVA), BTF: k.BTF != nil,
		}
		if k.Version.Major != 0 {
			doc.Kernel.Version = k.Version.String()
		}
		doc.Symbols = map[string]string{}
		for _, s := range exportedSymbols {
			if a, ok := k.Symbol(s); ok {
				doc.Symbols[s] = fmt.Sprintf("%#x", a)
			}
		}
	}
	return json.MarshalIndent(doc, "", "  ")
}

// Volatility 3 Intermediate Symbol Format (ISF), format 6.2.0
// (volatility3/schemas/schema-6.3.0.json accepts 6.x).
type isfDoc struct {
	Metadata  isfMetadata             `json:"metadata"`
	BaseTypes map[string]isfBaseType  `json:"base_types"`
	UserTypes map[string]isfUserType  `json:"user_types"`
	Enums     map[string]any          `json:"enums"`
	Symbols   map[string]isfSymbolDef `json:"symbols"`
}

type isfMetadata struct {
	Format   string            `json:"format"`
	Producer map[string]string `json:"producer"`
	Linux    map[string]any    `json:"linux"`
}

type isfBaseType struct {
	Kind   string `json:"kind"`
	Size   int    `json:"size"`
	Signed bool   `json:"signed"`
	Endian string `json:"endian"`
}

type isfUserType struct {
	Kind   string              `json:"kind"`
	Size   int64               `json:"size"`
	Fields map[string]isfField `json:"fields"`
}

type isfField struct {
	Offset int64          `json:"offset"`
	Type   map[string]any `json:"type"`
}

type isfSymbolDef struct {
	Address uint64         `json:"address"`
	Type    map[string]any `json:"type,omitempty"`
	// ConstantData is the symbol's content, base64 (encoding/json's
	// []byte encoding); Volatility matches linux_banner's against the
	// banner it finds in memory.
	ConstantData []byte `json:"constant_data,omitempty"`
}

func isfBase(name string) map[string]any { return map[string]any{"kind": "base", "name": name} }
func isfStruct(name string) map[string]any {
	return map[string]any{"kind": "struct", "name": name}
}
func isfPtr(sub map[string]any) map[string]any {
	return map[string]any{"kind": "pointer", "subtype": sub}
}
func isfArray(n int, sub map[string]any) map[string]any {
	return map[string]any{"kind": "array", "count": n, "subtype": sub}
}

// isfFieldTypes gives each exported member its C type.
var isfFieldTypes = map[string]map[string]any{
	"task_struct.tasks":         isfStruct("list_head"),
	"task_struct.comm":          isfArray(16, isfBase("char")),
	"task_struct.pid":           isfBase("int"),
	"task_struct.tgid":          isfBase("int"),
	"task_struct.real_parent":   isfPtr(isfStruct("task_struct")),
	"task_struct.parent":        isfPtr(isfStruct("task_struct")),
	"task_struct.mm":            isfPtr(isfStruct("mm_struct")),
	"task_struct.real_cred":     isfPtr(isfStruct("cred")),
	"task_struct.cred":          isfPtr(isfStruct("cred")),
	"task_struct.flags":         isfBase("unsigned int"),
	"task_struct.__state":       isfBase("unsigned int"),
	"task_struct.start_time":    isfBase("unsigned long long"),
	"task_struct.signal":        isfPtr(isfStruct("signal_struct")),
	"task_struct.thread_node":   isfStruct("list_head"),
	"signal_struct.thread_head": isfStruct("list_head"),
	"mm_struct.pgd":             isfPtr(isfBase("void")),
	"mm_struct.arg_start":       isfBase("unsigned long"),
	"mm_struct.arg_end":         isfBase("unsigned long"),
	"cred.uid":                  isfBase("unsigned int"),
	"cred.gid":                  isfBase("unsigned int"),
	"cred.euid":                 isfBase("unsigned int"),
	"cred.egid":                 isfBase("unsigned int"),
	"module.list":               isfStruct("list_head"),
	"module.name":               isfArray(moduleNameLen, isfBase("char")),
	"module.state":              isfBase("unsigned int"),
}

// ISF returns a Volatility 3 symbol table (ISF JSON) with the members
// kvmscope knows, their structures (sized from BTF when the kernel has
// it, else to the end of the last known member: enough to read these
// members, not to allocate the structures), list_head, the base types
// they use, and the symbols' link-time addresses (KASLR shift removed, as
// in System.map: Volatility finds the shift itself).
func (o *Offsets) ISF(k *Kernel) ([]byte, error) {
	doc := isfDoc{
		Metadata: isfMetadata{Format: "6.2.0", Producer: map[string]string{"name": "kvmscope", "version": "0.1.0"},
			Linux: map[string]any{}},
		BaseTypes: map[string]isfBaseType{
			"char":               {"char", 1, true, "little"},
			"int":                {"int", 4, true, "little"},
			"unsigned int":       {"int", 4, false, "little"},
			"long":               {"int", 8, true, "little"},
			"unsigned long":      {"int", 8, false, "little"},
			"unsigned long long": {"int", 8, false, "little"},
			"pointer":            {"int", 8, false, "little"},
			"void":               {"void", 0, false, "little"},
		},
		UserTypes: map[string]isfUserType{
			"list_head": {Kind: "struct", Size: 16, Fields: map[string]isfField{
				"next": {0, isfPtr(isfStruct("list_head"))},
				"prev": {8, isfPtr(isfStruct("list_head"))},
			}},
		},
		Enums:   map[string]any{},
		Symbols: map[string]isfSymbolDef{},
	}
	for _, m := range o.Members() {
		typ, ok := isfFieldTypes[m.Name]
		if !ok || !m.Known() {
			continue
		}
		strct, member, _ := strings.Cut(m.Name, ".")
		ut := doc.UserTypes[strct]
		if ut.Fields == nil {
			ut = isfUserType{Kind: "struct", Fields: map[string]isfField{}}
		}
		ut.Fields[member] = isfField{Offset: m.Value, Type: typ}
		ut.Size = max(ut.Size, m.Value+isfSize(typ))
		doc.UserTypes[strct] = ut
	}
	if k != nil && k.BTF != nil {
		for name, ut := range doc.UserTypes {
			if sz, err := k.btfStructSize(name); err == nil {
				ut.Size = int64(sz)
				doc.UserTypes[name] = ut
			}
		}
	}
	if k != nil {
		types := map[string]map[string]any{"init_task": isfStruct("task_struct"), "modules": isfStruct("list_head")}
		names := append([]string(nil), exportedSymbols...)
		sort.Strings(names)
		for _, s := range names {
			if a, ok := k.Symbol(s); ok {
				d := isfSymbolDef{Address: uint64(int64(a) - k.KASLRShift), Type: types[s]}
				if s == "linux_banner" && k.Banner != "" {
					d.ConstantData = []byte(k.Banner + "\n\x00")
				}
				doc.Symbols[s] = d
			}
		}
	}
	return json.MarshalIndent(doc, "", "  ")
}

// isfSize is the size of an ISF type as used in isfFieldTypes.
func isfSize(t map[string]any) int64 {
	switch t["kind"] {
	case "pointer":
		return 8
	case "array":
		return int64(t["count"].(int)) * isfSize(t["subtype"].(map[string]any))
	case "struct":
		return 16 // list_head
	}
	switch t["name"] {
	case "char":
		return 1
	case "int", "unsigned int":
		return 4
	}
	return 8
}
