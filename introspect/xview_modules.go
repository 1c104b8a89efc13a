package introspect

import (
	"bytes"
	"errors"
	"fmt"
	"sort"
	"strings"
)

// HiddenModule is a struct module some view sees that the modules list
// does not hold.
type HiddenModule struct {
	Name        string   `json:"name"`
	Addr        uint64   `json:"addr"`
	Base        uint64   `json:"base"`
	Size        uint64   `json:"size"`
	SeenBy      []string `json:"seen_by"`
	MissingFrom []string `json:"missing_from"`
}

// ModuleViews is the result of CrossViewModules.
type ModuleViews struct {
	Views    []ViewResult      `json:"views"`
	Hidden   []HiddenModule    `json:"hidden"`
	Warnings []string          `json:"warnings,omitempty"`
	Offsets  map[string]Offset `json:"offsets,omitempty"`
}

// Module view names.
const (
	ViewModules     = "modules"
	ViewModuleKset  = "module_kset"
	ViewModuleCarve = "module_carve"
)

// Bounds of the module carve.
const (
	maxCarvePages = 1 << 15 // 128 MiB of module area read at most
	maxCarved     = maxModules
)

// kobject layout without BTF (include/linux/kobject.h, unchanged since
// 2.6.25 save for members after sd): name, entry, parent, kset; and
// sizeof(struct kobject) without CONFIG_DEBUG_KOBJECT_RELEASE, after which
// struct module_kobject holds mod. Checked on every entry: its kset
// pointer leads back to module_kset, its mod is NULL (a built-in's
// parameters) or a pointer into the module area.
const (
	kobjNameDefault  = 0
	kobjEntryDefault = 8
	kobjKsetDefault  = 32
	mkobjModDefault  = 64
)

// CrossViewModules enumerates the loaded modules three ways and names the
// modules the modules list does not hold:
//
//   - modules: the list headed by kallsyms modules (Modules, lsmod);
//   - module_kset: the kobjects on module_kset's list (/sys/module): each
//     is a struct module_kobject whose mod points to its module (NULL for
//     the parameters of built-in code, which are not counted);
//   - module_carve: struct modules carved out of the mapped pages of the
//     module area (MODULES_VADDR..MODULES_END above the kernel image),
//     as Volatility's hidden_modules does: a valid name, a module state,
//     list links that are kernel addresses (or list_del's poison), a
//     core (before 6.4) or data (6.4+) region that holds the struct
//     itself, and, where known, mkobj.mod pointing back to it. At most
//     maxCarvePages pages are read.
//
// A module seen by module_kset or module_carve and not on the list is a
// finding (the list is walked again at the end: a module loaded while
// the guest ran is a warning; on a running guest a module being unloaded,
// off the list and not yet freed, can be carved for a moment). A listed module missing from another view is a warning only: a
// module is on the list before its sysfs entry exists (state coming) and
// after it is gone (going).
func (k *Kernel) CrossViewModules(off *Offsets) (*ModuleViews, error) {
	res := &ModuleViews{Hidden: []HiddenModule{}}
	var v viewOffsets
	var warn []string
	warnf := func(format string, args ...any) { warn = append(warn, fmt.Sprintf(format, args...)) }

	// modules.
	listView := ViewResult{Name: ViewModules}
	listed := map[uint64]Module{}
	ms, err := k.Modules(off)
	var pe *PartialError
	switch {
	case err == nil || errors.As(err, &pe):
		listView.Ran, listView.Count = true, len(ms)
		if pe != nil {
			listView.Reason = "damaged: " + strings.Join(pe.Warnings, "; ")
		}
	default:
		listView.Reason = err.Error()
	}
	for _, m := range ms {
		listed[m.Addr] = m
	}
	structKnown := off.ModuleName.Known() && off.ModuleList.Known()
	if k.BTF != nil {
		if a, err := k.MemberOffset("module", "mkobj"); err == nil {
			if b, err := k.MemberOffset("module_kobject", "mod"); err == nil {
				v.moduleMkobj = Offset{Value: int64(a + b), Source: SourceBTF, How: "module.mkobj + module_kobject.mod"}
			}
		}
	} else if structKnown && len(ms) > 0 {
		v.moduleMkobj = solveModuleSelf(k, off, ms)
	}

	// module_kset.
	ksetView, kset := k.moduleKset(off, &v, warnf)
	// module_carve.
	carveView, carved := k.moduleCarve(off, &v)
	res.Views = []ViewResult{listView, ksetView, carveView}

	type seen struct {
		name string
		by   []string
	}
	found := map[uint64]*seen{}
	var order []uint64
	note := func(addr uint64, name, view string) {
		s := found[addr]
		if s == nil {
			s = &seen{name: name}
			found[addr] = s
			order = append(order, addr)
		}
		if s.name == "" {
			s.name = name
		}
		s.by = append(s.by, view)
	}
	for _, e := range kset {
		note(e.addr, e.name, ViewModuleKset)
	}
	for _, c := range carved {
		note(c.Addr, c.Name, ViewModuleCarve)
	}
	ksetHas, carveHas := map[uint64]bool{}, map[uint64]bool{}
	for _, e := range kset {
		ksetHas[e.addr] = true
	}
	for _, c := range carved {
		carveHas[c.Addr] = true
	}
	for _, a := range order {
		if _, ok := listed[a]; ok || !listView.Ran {
			continue
		}
		s := found[a]
		h := HiddenModule{Name: s.name, Addr: a, SeenBy: append([]string{}, s.by...)}
		if structKnown {
			if m, err := readModule(k, off, a); err == nil {
				h.Name, h.Base, h.Size = m.Name, m.Base, m.Size
			}
		}
		h.MissingFrom = []string{ViewModules}
		if ksetView.Ran && !ksetHas[a] {
			h.MissingFrom = append(h.MissingFrom, ViewModuleKset)
		}
		if carveView.Ran && !carveHas[a] {
			h.MissingFrom = append(h.MissingFrom, ViewModuleCarve)
		}
		res.Hidden = append(res.Hidden, h)
	}
	for _, m := range ms {
		if ksetView.Ran && !ksetHas[m.Addr] {
			warnf("module %s (state %s) is listed but has no kobject on module_kset", m.Name, m.State)
		}
		if carveView.Ran && !carveHas[m.Addr] {
			warnf("module %s at %#x is listed but the carve did not find it", m.Name, m.Addr)
		}
	}
	// A module loaded while the guest ran is on the list now: walk it
	// again, and drop such findings with a warning.
	if len(res.Hidden) > 0 {
		if again, err := k.Modules(off); err == nil || errors.As(err, &pe) {
			now := map[uint64]bool{}
			for _, m := range again {
				now[m.Addr] = true
			}
			kept := res.Hidden[:0]
			for _, h := range res.Hidden {
				if now[h.Addr] {
					warnf("module %s at %#x was not on the modules list but is now: loaded while the guest ran (not a finding)", h.Name, h.Addr)
					continue
				}
				kept = append(kept, h)
			}
			res.Hidden = kept
		}
	}
	sort.Slice(res.Hidden, func(i, j int) bool { return res.Hidden[i].Addr < res.Hidden[j].Addr })
	res.Warnings = warn
	res.Offsets = v.members()
	return res, nil
}

// solveModuleSelf finds module.mkobj.mod: the pointer after the name
// that holds the module's own address in every listed module (the
// solver's anchor for module.list).
func solveModuleSelf(k *Kernel, off *Offsets, ms []Module) Offset {
	var cands []candidate
	start := int(off.ModuleName.Value) + moduleNameLen
	imgs := make([][]byte, 0, len(ms))
	for _, m := range ms {
		b, err := readUpTo(k, m.Addr, start+0x100)
		if err != nil {
			return Offset{}
		}
		imgs = append(imgs, b)
	}
	for o := (start + 7) &^ 7; o+8 <= start+0x100; o += 8 {
		ok := true
		for i, m := range ms {
			if le64(imgs[i], o) != m.Addr {
				ok = false
				break
			}
		}
		if ok {
			cands = append(cands, candidate{off: o})
		}
	}
	c, err := one("module.mkobj.mod", cands)
	if err != nil {
		return Offset{}
	}
	return solved(c.off, fmt.Sprintf("the pointer after the name holding the module's own address in all %d listed modules (mkobj.mod)", len(ms)))
}

// ksetEntry is one module kobject: the module it points to and its name.
type ksetEntry struct {
	addr uint64
	name string
}

// moduleKset runs the module_kset view.
func (k *Kernel) moduleKset(off *Offsets, v *viewOffsets, warnf func(string, ...any)) (ViewResult, []ksetEntry) {
	vr := ViewResult{Name: ViewModuleKset}
	sym, ok := k.Symbol("module_kset")
	if !ok {
		vr.Reason = "kallsyms has no module_kset (no CONFIG_MODULES or CONFIG_SYSFS, or no data symbols)"
		return vr, nil
	}
	kset, err := k.ReadU64(sym)
	if err != nil || !k.kernelPtr(kset) {
		vr.Reason = fmt.Sprintf("module_kset is %#x (%v)", kset, err)
		return vr, nil
	}
	listOff := Offset{Value: 0, Source: SourceSolved, How: "struct kset begins with its list"}
	kobjKset := Offset{}
	if k.BTF != nil {
		var errs []error
		var err error
		if listOff, err = k.btfOffset("kset", "list"); err != nil {
			errs = append(errs, err)
		}
		if v.kobjEntry, err = k.btfOffset("kobject", "entry"); err != nil {
			errs = append(errs, err)
		}
		if v.kobjName, err = k.btfOffset("kobject", "name"); err != nil {
			errs = append(errs, err)
		}
		if v.mkobjMod, err = k.btfOffset("module_kobject", "mod"); err != nil {
			errs = append(errs, err)
		}
		if kobjKset, err = k.btfOffset("kobject", "kset"); err != nil {
			errs = append(errs, err)
		}
		if len(errs) > 0 {
			vr.Reason = "offsets: " + errors.Join(errs...).Error()
			return vr, nil
		}
	} else {
		how := "kobject layout (name, entry, parent, kset) checked on every entry: its kset pointer leads back to module_kset"
		v.kobjName = solved(kobjNameDefault, how)
		v.kobjEntry = solved(kobjEntryDefault, how)
		kobjKset = solved(kobjKsetDefault, how)
		v.mkobjMod = solved(mkobjModDefault, "sizeof(struct kobject) without CONFIG_DEBUG_KOBJECT_RELEASE; checked on every entry: NULL (built-in parameters) or a pointer into the module area, whose name is the kobject's")
	}
	nodes, damage, err := walkList(k, kset+uint64(listOff.Value), maxModules+1<<12, nil)
	if err != nil {
		vr.Reason = err.Error()
		return vr, nil
	}
	var out []ksetEntry
	var bad []string
	for _, n := range nodes {
		kobj := n - uint64(v.kobjEntry.Value)
		b := make([]byte, max(v.mkobjMod.Value, kobjKset.Value, v.kobjName.Value)+8)
		if err := k.ReadVirt(b, kobj); err != nil {
			bad = append(bad, fmt.Sprintf("kobject at %#x: %v", kobj, err))
			continue
		}
		if ks := le64(b, int(kobjKset.Value)); ks != kset {
			if k.BTF == nil {
				vr.Reason = fmt.Sprintf("kobject at %#x: kset %#x, not module_kset %#x: the default kobject layout does not fit", kobj, ks, kset)
				return vr, nil
			}
			bad = append(bad, fmt.Sprintf("kobject at %#x: kset %#x, not module_kset", kobj, ks))
			continue
		}
		name := readCString(k, le64(b, int(v.kobjName.Value)), moduleNameLen)
		mod := le64(b, int(v.mkobjMod.Value))
		if mod == 0 {
			continue // the parameters of built-in code
		}
		if mod < modulesStart || mod >= modulesEnd {
			if k.BTF == nil {
				vr.Reason = fmt.Sprintf("kobject %q at %#x: mod %#x is not in the module area: the default module_kobject layout does not fit", name, kobj, mod)
				return vr, nil
			}
			bad = append(bad, fmt.Sprintf("kobject %q: mod %#x is not in the module area", name, mod))
			continue
		}
		if off.ModuleName.Known() {
			nb := make([]byte, moduleNameLen)
			if err := k.ReadVirt(nb, mod+uint64(off.ModuleName.Value)); err == nil {
				if mn, ok := moduleName(nb); ok && mn != name {
					warnf("kobject %q points to module %q at %#x", name, mn, mod)
				}
			}
		}
		out = append(out, ksetEntry{mod, name})
	}
	vr.Ran, vr.Count = true, len(out)
	if damage != "" {
		bad = append([]string{damage}, bad...)
	}
	if len(bad) > 0 {
		vr.Reason = "damaged: " + strings.Join(bad, "; ")
	}
	return vr, out
}

// readCString reads a NUL-terminated string of at most n bytes at va
// ("" when unreadable).
func readCString(k *Kernel, va uint64, n int) string {
	if !k.kernelPtr(va) {
		return ""
	}
	b, err := readUpTo(k, va, n)
	if err != nil {
		return ""
	}
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}
