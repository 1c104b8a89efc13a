//go:build linux && amd64

package tracer

import (
	"strings"
	"testing"
)

// TestCheckRegs: values that would fail VM entry are refused before they
// reach kvm_run.
func TestCheckRegs(t *testing.T) {
	long := KVMSregs{EFER: 1 << 10, CS: KVMSegment{L: 1}}
	la57 := long
	la57.CR4 = 1 << 12
	old := KVMRegs{RIP: 0x100000, RFLAGS: 0x202}
	with := func(f func(*KVMRegs)) KVMRegs { r := old; f(&r); return r }
	for _, c := range []struct {
		name string
		regs KVMRegs
		s    KVMSregs
		want string // "" accepted
	}{
		{"unchanged", old, long, ""},
		{"rflags IF|DF|1", with(func(r *KVMRegs) { r.RFLAGS = 0x602 }), long, ""},
		{"rflags bit 1 clear", with(func(r *KVMRegs) { r.RFLAGS = 0x200 }), long, "bit 1"},
		{"rflags bit 3", with(func(r *KVMRegs) { r.RFLAGS = 0x20a }), long, "reserved"},
		{"rflags bit 63", with(func(r *KVMRegs) { r.RFLAGS = 1<<63 | 2 }), long, "reserved"},
		{"rip kernel half", with(func(r *KVMRegs) { r.RIP = 0xffffffff81000000 }), long, ""},
		{"rip non-canonical", with(func(r *KVMRegs) { r.RIP = 0x0000800000000000 }), long, "not canonical"},
		{"rip 57-bit", with(func(r *KVMRegs) { r.RIP = 0x0000800000000000 }), la57, ""},
		{"rip above 4 GiB in 32-bit mode", with(func(r *KVMRegs) { r.RIP = 1 << 32 }), KVMSregs{}, "32-bit"},
		{"rip in 32-bit mode", with(func(r *KVMRegs) { r.RIP = 0xfff0 }), KVMSregs{}, ""},
	} {
		err := checkRegs(c.regs, old, c.s)
		if (c.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.want)) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
}
