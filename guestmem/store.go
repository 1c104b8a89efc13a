package guestmem

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/kvmscope/kvmscope/internal/x86regs"
	"github.com/kvmscope/kvmscope/tracer"
	"golang.org/x/arch/x86/x86asm"
)

// StoreInsn is the guest instruction that made a store the guard blocked.
type StoreInsn struct {
	RIP  uint64 `json:"rip"`
	GVA  uint64 `json:"gva"`
	Insn string `json:"insn"`
}

// maxInsnLen is the architectural limit on an x86 instruction's length.
const maxInsnLen = 15

// FindStore finds the guest instruction behind a store to gpa that KVM
// emulated (a store into a read-only memslot, tracer/guard.go), from the
// registers at the exit. KVM has advanced RIP past a completed store, so
// the instruction ends at regs' RIP: each start up to 15 bytes back is
// decoded with x86asm, and the one that ends exactly there, is a store,
// and whose memory operand, computed from the registers (a plain store
// changes none), translates to gpa's page, is it. Prefixes make the
// bytes ambiguous (48 89 04 25 is a 64-bit store, and its last 7 bytes a
// 32-bit one): a candidate must store as many bytes as data holds, and
// the value its source register holds, where known. A REP string store
// still running is at RIP itself. Guest memory is hostile: reads are
// bounded to 30 bytes and a failure is an error, never a guess.
func FindStore(mem Memory, regs tracer.SyncRegs, gpa uint64, data []byte) (StoreInsn, error) {
	cpu := cpuFromKVM(0, regs)
	levels := cpu.Paging()
	if levels < 4 {
		return StoreInsn{}, fmt.Errorf("vCPU not in 64-bit paging (%s mode, %d levels)", cpu.Mode(), levels)
	}
	as := NewWalker(mem, cpu.CR3, levels)
	next := regs.Regs.RIP
	r := regs.Regs
	f := x86regs.File{r.RAX, r.RCX, r.RDX, r.RBX, r.RSP, r.RBP, r.RSI, r.RDI,
		r.R8, r.R9, r.R10, r.R11, r.R12, r.R13, r.R14, r.R15, next}

	// The bytes before next and after it (for a string store at next).
	code := make([]byte, 2*maxInsnLen)
	lo := next - maxInsnLen
	for i := range code {
		var b [1]byte
		if _, err := as.ReadAt(b[:], int64(lo+uint64(i))); err != nil {
			if i < maxInsnLen {
				code[i] = 0xf4 // unreadable: no instruction starts here
				continue
			}
			code = code[:i]
			break
		}
		code[i] = b[0]
	}
	if len(code) > maxInsnLen {
		if inst, err := x86asm.Decode(code[maxInsnLen:], 64); err == nil {
			if st, ok := f.StoreOf(inst); ok && st.String && st.Rep && r.RCX > 0 {
				return StoreInsn{RIP: next, GVA: r.RDI, Insn: inst.String()}, nil
			}
		}
	}
	for back := 1; back <= maxInsnLen; back++ {
		start := maxInsnLen - back
		inst, err := x86asm.Decode(code[start:maxInsnLen], 64)
		if err != nil || inst.Len != back {
			continue
		}
		st, ok := f.StoreOf(inst)
		if !ok || (len(data) > 0 && st.Size < len(data)) {
			continue
		}
		if st.Known && len(data) == st.Size {
			var v [8]byte
			binary.LittleEndian.PutUint64(v[:], st.Value)
			if !bytes.Equal(v[:st.Size], data) {
				continue
			}
		}
		f[x86regs.RIP] = next - uint64(back)
		var gva uint64
		if st.String {
			// Done: RDI has moved past the element.
			gva = r.RDI - uint64(st.Size)
			if r.RFLAGS&(1<<10) != 0 {
				gva = r.RDI + uint64(st.Size)
			}
		} else if gva, ok = f.Addr(inst, st.Mem); !ok {
			continue
		}
		if storeHits(as, gva, st.Size, gpa) {
			return StoreInsn{RIP: next - uint64(back), GVA: gva, Insn: inst.String()}, nil
		}
	}
	return StoreInsn{}, errors.New("no store instruction ending at RIP writes that address")
}

// storeHits reports whether a size-byte store at gva writes gpa's page.
func storeHits(as *AddressSpace, gva uint64, size int, gpa uint64) bool {
	if size <= 0 {
		size = 1
	}
	for _, a := range []uint64{gva, gva + uint64(size) - 1} {
		if pa, err := as.Translate(a); err == nil && pa&^0xfff == gpa&^0xfff {
			return true
		}
	}
	return false
}
