//go:build linux && amd64

package tracer

import (
	"encoding/binary"
	"testing"

	"fmt"
	"strings"

	"github.com/kvmscope/kvmscope/tracer/ioctl"
	"github.com/kvmscope/kvmscope/tracer/policy"
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

// runFilter runs a filter in x/net/bpf's interpreter.
func runFilter(t *testing.T, p *policy.Policy, data []byte) uint32 {
	t.Helper()
	prog, err := Filter(p)
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
	got, err := vm.Run(data)
	if err != nil {
		t.Fatal(err)
	}
	return uint32(got)
}

// TestFilter checks the filter's verdicts for three kinds of policy; the
// kernel's verdicts on the same programs are covered end to end by
// enforce_test.go and the cmd/kvmscope tests (every vCPU and memslot is
// seen).
func TestFilter(t *testing.T) {
	const trace, allow = unix.SECCOMP_RET_TRACE, unix.SECCOMP_RET_ALLOW
	ioctlCall := func(cmd uint64) []byte { return seccompData(unix.SYS_IOCTL, auditArchX8664, 8, cmd, 1) }
	kvmSetMSRS := uint64(0x4008ae89)
	kvmSetCPUID2 := uint64(0x4008ae90)
	trapSome := mustParse(t, fmt.Sprintf(testPolicy, "enforce"))
	trapAll := mustParse(t, "default: log\nrules:\n  - ioctl: [KVM_RUN, KVM_SET_MSRS, KVM_SET_CPUID2]\n    action: allow\n")
	cases := []struct {
		name string
		p    *policy.Policy
		data []byte
		want uint32
	}{
		{"KVM_CREATE_VM", nil, ioctlCall(KVMCreateVM), trace},
		{"KVM_CREATE_VCPU", nil, ioctlCall(KVMCreateVCPU), trace},
		{"KVM_SET_USER_MEMORY_REGION", nil, ioctlCall(KVMSetUserMemoryRegion), trace},
		{"KVM_SET_USER_MEMORY_REGION2", nil, ioctlCall(kvmSetUserMemoryRegion2), trace},
		{"high bits", nil, ioctlCall(0xffffffff00000000 | KVMRun), trace},
		{"KVM_RUN", nil, ioctlCall(KVMRun), allow},
		{"KVM_SET_MSRS (the tracer follows QEMU's puts), no policy", nil, ioctlCall(kvmSetMSRS), trace},
		{"KVM_SET_CPUID2, no policy", nil, ioctlCall(kvmSetCPUID2), allow},
		{"KVM_SET_MSRS, a rule", trapSome, ioctlCall(kvmSetMSRS), trace},
		{"KVM_RUN, a rule elsewhere", trapSome, ioctlCall(KVMRun), allow},
		{"TCGETS", trapSome, ioctlCall(unix.TCGETS), allow},
		{"read", trapSome, seccompData(unix.SYS_READ, auditArchX8664, 3, KVMCreateVM), allow},
		{"i386 ABI", nil, seccompData(54, auditArchI386, 3, KVMCreateVM), trace},
		{"x32 ABI", nil, seccompData(x32SyscallBit|unix.SYS_IOCTL, auditArchX8664, 3, KVMCreateVM), trace},
		{"trap all: KVM_RUN allowed", trapAll, ioctlCall(KVMRun), allow},
		{"trap all: KVM_SET_CPUID2 allowed", trapAll, ioctlCall(kvmSetCPUID2), allow},
		{"trap all: KVM_SET_MSRS allowed, still stops (bookkeeping)", trapAll, ioctlCall(kvmSetMSRS), trace},
		{"trap all: bookkeeping still stops", trapAll, ioctlCall(KVMCreateVCPU), trace},
		{"trap all: TCGETS", trapAll, ioctlCall(unix.TCGETS), trace},
		{"trap all: KVM_RUN with high bits", trapAll, ioctlCall(0x100000000 | KVMRun), trace},
		// QEMU passes requests as an int: bit 31 set arrives sign-extended.
		{"KVM_IRQ_LINE_STATUS sign-extended, no policy", nil, ioctlCall(0xffffffffc008ae67), allow},
		{"KVM_GET_MSRS (the tracer reads MSRs), no policy", nil, ioctlCall(0xffffffffc008ae88), trace},
		{"KVM_GET_MSRS sign-extended, a rule", mustParse(t, "rules:\n  - ioctl: KVM_GET_MSRS\n    action: log\n"), ioctlCall(0xffffffffc008ae88), trace},
		{"trap all: KVM_GET_SUPPORTED_CPUID sign-extended allowed", mustParse(t, "default: log\nrules:\n  - ioctl: KVM_GET_SUPPORTED_CPUID\n    action: allow\n"), ioctlCall(0xffffffffc008ae05), allow},
		{"trap all: KVM_GET_MSRS other high bits", mustParse(t, "default: log\nrules:\n  - ioctl: KVM_GET_MSRS\n    action: allow\n"), ioctlCall(0xfffffffec008ae88), trace},
		{"sign-extended form of a request without bit 31", nil, ioctlCall(0xffffffff00000000 | KVMCreateVCPU), trace},
		{"trap all: write", trapAll, seccompData(unix.SYS_WRITE, auditArchX8664, 1), allow},
	}
	for _, tc := range cases {
		if got := runFilter(t, tc.p, tc.data); got != tc.want {
			t.Errorf("%s: verdict %#x, want %#x", tc.name, got, tc.want)
		}
	}
}

// A policy naming hundreds of requests still makes a filter (the old
// hand-patched jumps stopped near 250).
func TestFilterManyRequests(t *testing.T) {
	var b strings.Builder
	b.WriteString("rules:\n")
	for i := 0; i < 600; i++ {
		fmt.Fprintf(&b, "  - ioctl: %#x\n    action: log\n", 0x1000+i)
	}
	p := mustParse(t, b.String())
	if got := runFilter(t, p, seccompData(unix.SYS_IOCTL, auditArchX8664, 8, 0x1000+599)); got != unix.SECCOMP_RET_TRACE {
		t.Errorf("the 600th request: verdict %#x, want trace", got)
	}
	if got := runFilter(t, p, seccompData(unix.SYS_IOCTL, auditArchX8664, 8, 0x1000+600)); got != unix.SECCOMP_RET_ALLOW {
		t.Errorf("an unnamed request: verdict %#x, want allow", got)
	}
}

func TestMemslotTable(t *testing.T) {
	tab := memslotTable{}
	region := func(slot, flags uint32, gpa, size, hva uint64) ioctl.MemoryRegion {
		return ioctl.MemoryRegion{Slot: slot, Flags: flags, GuestPhysAddr: gpa, MemorySize: size, UserspaceAddr: hva}
	}
	tab.apply(memslotOf(region(0, 0, 0, 0xa0000, 0x7f0000000000)))
	tab.apply(memslotOf(region(1, kvmMemReadonly, 0xfffc0000, 0x40000, 0x7f1000000000)))
	tab.apply(memslotOf(region(1<<16, 0, 0, 0xa0000, 0x7f2000000000))) // address space 1 (SMM), slot 0
	tab.apply(memslotOf(region(2, kvmMemLogDirtyPages, 0xfd000000, 16<<20, 0x7f3000000000)))
	tab.apply(memslotOf(region(2, 0, 0xfd000000, 0, 0))) // delete
	s := tab.sorted()
	if len(s) != 3 || s[0].GPA != 0 || s[1].GPA != 0xfffc0000 || !s[1].ReadOnly || s[2].AddressSpace() != 1 {
		t.Fatalf("table = %+v", s)
	}
}
