package introspect

import (
	"encoding/binary"
	"fmt"
)

// The interrupt descriptor table, which the IDTR of each vCPU points at:
// on x86-64 Linux the read-only alias of idt_table in the CPU entry area
// (0xfffffe0000000000), mapped by the kernel's page tables, so it is read
// through them. 64-bit gates are 16 bytes (SDM vol. 3, 6.14.1): offset
// 15:0, selector, IST and type/DPL/P, offset 31:16, offset 63:32.

// readIDT reads the 256 gates of the IDT at base: one page, whatever the
// limit says (Linux's is 0xfff).
func (k *Kernel) readIDT(base uint64) ([]Gate, error) {
	b := make([]byte, idtGates*idtGateSize)
	if err := k.ReadVirt(b, base); err != nil {
		return nil, fmt.Errorf("IDT at %#x: %w", base, err)
	}
	return parseIDT(b), nil
}

// parseIDT decodes the gates in b, as many as it holds whole.
func parseIDT(b []byte) []Gate {
	out := make([]Gate, 0, len(b)/idtGateSize)
	for v := 0; (v+1)*idtGateSize <= len(b) && v < idtGates; v++ {
		g := b[v*idtGateSize:]
		h := uint64(binary.LittleEndian.Uint16(g[0:])) |
			uint64(binary.LittleEndian.Uint16(g[6:]))<<16 |
			uint64(binary.LittleEndian.Uint32(g[8:]))<<32
		out = append(out, Gate{Vector: v, Handler: h, Present: g[5]&0x80 != 0})
	}
	return out
}
