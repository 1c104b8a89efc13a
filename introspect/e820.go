package introspect

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The firmware's memory map, as the guest kernel keeps it.
//
// On a PC the firmware (SeaBIOS, OVMF, or QEMU's own for -kernel boots)
// hands the kernel a BIOS E820 table of physical ranges and their types,
// built from what QEMU told it of the machine's RAM (fw_cfg "etc/e820").
// Linux copies it at boot into e820_table_firmware (arch/x86/kernel/
// e820.c), which it never changes later, unlike e820_table (memmap=, EFI
// fixups). It is the guest's own statement of where RAM is: a memory map
// built without QEMU's monitor is checked against it.

// E820Entry is one range of the table (struct e820_entry, packed: addr,
// size, type).
type E820Entry struct {
	Addr uint64 `json:"addr"`
	Size uint64 `json:"size"`
	Type uint32 `json:"type"`
}

// E820RAM is the type of usable RAM.
const E820RAM = 1

const (
	e820EntrySize = 20
	// maxE820 bounds nr_entries: E820_MAX_ENTRIES is 128 + 3 *
	// MAX_NUMNODES, 3200 for the largest NODES_SHIFT (10).
	maxE820 = 128 + 3*1024
)

// ErrNoE820 is a kernel whose firmware memory map cannot be found (its
// kallsyms holds no data symbols, or it predates e820_table_firmware).
var ErrNoE820 = errors.New("the guest kernel's e820_table_firmware is not in its symbols")

// E820 reads the firmware memory map the guest kernel kept.
func (k *Kernel) E820() ([]E820Entry, error) {
	sym, ok := k.Symbol("e820_table_firmware")
	if !ok {
		return nil, ErrNoE820
	}
	// A pointer to the table (struct e820_table *e820_table_firmware).
	table, err := k.ReadPtr(sym)
	if err != nil {
		return nil, fmt.Errorf("e820_table_firmware: %w", err)
	}
	n, err := k.ReadU32(table)
	if err != nil {
		return nil, fmt.Errorf("e820_table_firmware at %#x: %w", table, err)
	}
	if n > maxE820 {
		return nil, fmt.Errorf("e820_table_firmware at %#x: %d entries, more than the kernel holds (%d)", table, n, maxE820)
	}
	b := make([]byte, 4+e820EntrySize*int(n))
	if err := k.ReadVirt(b, table); err != nil {
		return nil, fmt.Errorf("e820_table_firmware at %#x: %w", table, err)
	}
	return parseE820(b)
}

// parseE820 decodes a struct e820_table: nr_entries, then that many
// packed entries. Entries must not wrap around the address space.
func parseE820(b []byte) ([]E820Entry, error) {
	if len(b) < 4 {
		return nil, errors.New("e820 table: too short")
	}
	n := binary.LittleEndian.Uint32(b)
	if n > maxE820 || len(b) < 4+e820EntrySize*int(n) {
		return nil, fmt.Errorf("e820 table: %d entries in %d bytes", n, len(b))
	}
	out := make([]E820Entry, n)
	for i := range out {
		e := b[4+e820EntrySize*i:]
		out[i] = E820Entry{Addr: binary.LittleEndian.Uint64(e), Size: binary.LittleEndian.Uint64(e[8:]), Type: binary.LittleEndian.Uint32(e[16:])}
		if out[i].Addr+out[i].Size < out[i].Addr {
			return nil, fmt.Errorf("e820 table: entry %d (%#x, %#x bytes) wraps around", i, out[i].Addr, out[i].Size)
		}
	}
	return out, nil
}
