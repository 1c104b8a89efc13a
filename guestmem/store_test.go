package guestmem

import (
	"testing"

	"github.com/kvmscope/kvmscope/tracer"
)

// TestFindStorePrefix: "48 89 04 25 disp32" (mov [disp32], rax) ends at
// RIP, and so does its tail "89 04 25 disp32" (mov [disp32], eax). The
// 8 bytes the exit holds and RAX's value pick the first.
func TestFindStorePrefix(t *testing.T) {
	pt := make([]byte, 0x4000)
	copy(pt[0x1000:], entries(0x2003))
	copy(pt[0x2000:], entries(0x83)) // 0..1 GiB, one page
	copy(pt[0x3000:], []byte{0x48, 0x89, 0x04, 0x25, 0x00, 0x21, 0x00, 0x00})
	var regs tracer.SyncRegs
	regs.Regs.RIP, regs.Regs.RAX = 0x3008, 0x4142434445464748
	regs.Sregs.CR0, regs.Sregs.CR3, regs.Sregs.CR4, regs.Sregs.EFER, regs.Sregs.CS.L = CR0PE|CR0PG, 0x1000, CR4PAE, EFERLMA, 1
	st, err := FindStore(cyclicMemory(pt), regs, 0x2100, []byte("HGFEDCBA"))
	if err != nil || st.RIP != 0x3000 || st.GVA != 0x2100 {
		t.Fatalf("FindStore = %+v, %v; want rip 0x3000 gva 0x2100", st, err)
	}
	// A store of other bytes is not this instruction.
	if st, err := FindStore(cyclicMemory(pt), regs, 0x2100, []byte("12345678")); err == nil {
		t.Errorf("FindStore with other bytes = %+v, want an error", st)
	}
}
