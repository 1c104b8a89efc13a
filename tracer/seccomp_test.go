//go:build linux && amd64

package tracer

import (
	"encoding/binary"
	"testing"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// seccompData builds a struct seccomp_data for x/net/bpf's interpreter.
// Seccomp loads 32-bit words in the host's byte order, x/net/bpf in
// network order, so each word is stored big-endian here to make the
// interpreter read the value the kernel reads on x86-64 (where a u64
// argument is its low word, then its high word).
func seccompData(nr, arch uint32, args ...uint64) []byte {
	b := make([]byte, 64)
	be := binary.BigEndian
	be.PutUint32(b[0:], nr)
	be.PutUint32(b[4:], arch)
	for i, a := range args {
		be.PutUint32(b[16+8*i:], uint32(a))
		be.PutUint32(b[16+8*i+4:], uint32(a>>32))
	}
	return b
}

// TestFilter runs the assembled filter in x/net/bpf's interpreter; the
// kernel's verdicts on the same program are covered end to end by the
// cmd/kvmscope tests (every vCPU and memslot is seen).
func TestFilter(t *testing.T) {
	prog, err := buildFilter(trappedIoctls)
	if err != nil {
		t.Fatal(err)
	}
	raw := make([]bpf.RawInstruction, len(prog))
	for i, f := range prog {
		raw[i] = bpf.RawInstruction{Op: f.Code, Jt: f.Jt, Jf: f.Jf, K: f.K}
	}
	insns, ok := bpf.Disassemble(raw)
	if !ok {
		t.Fatal("filter does not disassemble")
	}
	vm, err := bpf.NewVM(insns)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		data []byte
		want uint32
	}{
		{"KVM_CREATE_VM", seccompData(unix.SYS_IOCTL, auditArchX8664, 3, KVMCreateVM), unix.SECCOMP_RET_TRACE},
		{"KVM_CREATE_VCPU", seccompData(unix.SYS_IOCTL, auditArchX8664, 8, KVMCreateVCPU, 1), unix.SECCOMP_RET_TRACE},
		{"KVM_SET_USER_MEMORY_REGION", seccompData(unix.SYS_IOCTL, auditArchX8664, 8, KVMSetUserMemoryRegion), unix.SECCOMP_RET_TRACE},
		{"KVM_SET_USER_MEMORY_REGION2", seccompData(unix.SYS_IOCTL, auditArchX8664, 8, kvmSetUserMemoryRegion2), unix.SECCOMP_RET_TRACE},
		{"high bits ignored", seccompData(unix.SYS_IOCTL, auditArchX8664, 8, 0xffffffff00000000|KVMCreateVCPU), unix.SECCOMP_RET_TRACE},
		{"KVM_RUN", seccompData(unix.SYS_IOCTL, auditArchX8664, 9, KVMRun), unix.SECCOMP_RET_ALLOW},
		{"TCGETS", seccompData(unix.SYS_IOCTL, auditArchX8664, 0, unix.TCGETS), unix.SECCOMP_RET_ALLOW},
		{"read", seccompData(unix.SYS_READ, auditArchX8664, 3, KVMCreateVM), unix.SECCOMP_RET_ALLOW},
		{"i386 ABI", seccompData(54, 0x40000003, 3, KVMCreateVM), unix.SECCOMP_RET_ALLOW},
	}
	for _, tc := range cases {
		got, err := vm.Run(tc.data)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if uint32(got) != tc.want {
			t.Errorf("%s: verdict %#x, want %#x", tc.name, got, tc.want)
		}
	}
}

func TestMemslotTable(t *testing.T) {
	tab := memslotTable{}
	region := func(slot, flags uint32, gpa, size, hva uint64) []byte {
		b := make([]byte, kvmUserspaceMemoryRegionLen)
		binary.LittleEndian.PutUint32(b[0:], slot)
		binary.LittleEndian.PutUint32(b[4:], flags)
		binary.LittleEndian.PutUint64(b[8:], gpa)
		binary.LittleEndian.PutUint64(b[16:], size)
		binary.LittleEndian.PutUint64(b[24:], hva)
		return b
	}
	tab.apply(parseMemoryRegion(region(0, 0, 0, 0xa0000, 0x7f0000000000)))
	tab.apply(parseMemoryRegion(region(1, kvmMemReadonly, 0xfffc0000, 0x40000, 0x7f1000000000)))
	tab.apply(parseMemoryRegion(region(1<<16, 0, 0, 0xa0000, 0x7f2000000000))) // address space 1 (SMM), slot 0
	tab.apply(parseMemoryRegion(region(2, kvmMemLogDirtyPages, 0xfd000000, 16<<20, 0x7f3000000000)))
	tab.apply(parseMemoryRegion(region(2, 0, 0xfd000000, 0, 0))) // delete
	s := tab.sorted()
	if len(s) != 3 || s[0].GPA != 0 || s[1].GPA != 0xfffc0000 || !s[1].ReadOnly || s[2].AddressSpace() != 1 {
		t.Fatalf("table = %+v", s)
	}
}
