package introspect

import (
	"bytes"
	"fmt"
)

// Module is one loaded kernel module.
type Module struct {
	Name string `json:"name"`
	// Base is the start of the module's text (core_layout.base before
	// 6.4, mem[MOD_TEXT].base since), as /proc/modules shows it.
	Base uint64 `json:"base"`
	// Size is what /proc/modules shows: the size of the module's core
	// regions.
	Size uint64 `json:"size"`
	// State is live, coming, going or unformed.
	State string `json:"state,omitempty"`
	// Addr is the struct module's kernel virtual address.
	Addr uint64 `json:"addr"`
}

var moduleStates = []string{"live", "coming", "going", "unformed"}

// Modules lists the loaded modules from the list headed by the kallsyms
// symbol modules, in list order (newest first, as /proc/modules). A
// damaged list (see PartialError) gives the modules read before the break
// and a *PartialError.
func (k *Kernel) Modules(off *Offsets) ([]Module, error) {
	head, ok := k.Symbol("modules")
	if !ok {
		return nil, fmt.Errorf("modules: kallsyms has no modules symbol: %w", ErrNotFound)
	}
	return modulesAt(k, off, head)
}

func modulesAt(k *Kernel, off *Offsets, head uint64) ([]Module, error) {
	partial := &PartialError{}
	nodes, damage, err := walkList(k, head, maxModules, nil)
	if err != nil {
		return nil, fmt.Errorf("modules: %w", err)
	}
	if damage != "" {
		if len(nodes) == 0 {
			return nil, fmt.Errorf("modules: %s", damage)
		}
		partial.add("modules: %s", damage)
	}
	if len(nodes) == 0 {
		return []Module{}, nil
	}
	if !off.ModuleList.Known() || !off.ModuleName.Known() {
		return nil, fmt.Errorf("modules: module.list and module.name: %w", ErrOffsetsMissing)
	}
	out := make([]Module, 0, len(nodes))
	for _, n := range nodes {
		m, err := readModule(k, off, n-uint64(off.ModuleList.Value))
		if err != nil {
			partial.add("modules: %v", err)
			break
		}
		out = append(out, m)
	}
	return out, partial.orNil()
}

// readModule reads the struct module at addr.
func readModule(k *Kernel, off *Offsets, addr uint64) (Module, error) {
	m := Module{Addr: addr}
	name := make([]byte, moduleNameLen)
	if err := k.ReadVirt(name, addr+uint64(off.ModuleName.Value)); err != nil {
		return m, fmt.Errorf("name of module at %#x: %w", addr, err)
	}
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	m.Name = string(name)
	if off.ModuleState.Known() {
		if v, err := k.ReadU32(addr + uint64(off.ModuleState.Value)); err == nil && int(v) < len(moduleStates) {
			m.State = moduleStates[v]
		}
	}
	if off.ModuleBase.Known() {
		if v, err := k.ReadPtr(addr + uint64(off.ModuleBase.Value)); err == nil {
			m.Base = v
		}
	}
	if off.ModuleSize.Known() {
		m.Size = moduleSize(k, off, addr)
	}
	return m, nil
}

// moduleSize is /proc/modules' size: core_layout.size + init_layout.size
// before 6.4 (init is 0 once loaded, so core alone), the sum over mem[]
// since.
func moduleSize(k *Kernel, off *Offsets, addr uint64) uint64 {
	if !off.ModuleMemStride.Known() {
		v, err := k.ReadU32(addr + uint64(off.ModuleSize.Value))
		if err != nil {
			return 0
		}
		return uint64(v)
	}
	var total uint64
	for i := range modMemTypes {
		v, err := k.ReadU32(addr + uint64(off.ModuleSize.Value) + uint64(i)*uint64(off.ModuleMemStride.Value))
		if err != nil || v >= 1<<30 {
			break
		}
		total += uint64(v)
	}
	return total
}
