package ioctl

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// bytesAt is caller memory holding b at address base, and nothing else.
type bytesAt struct {
	base  uint64
	b     []byte
	reads int
}

var errUnmapped = errors.New("unmapped")

func (m *bytesAt) ReadAt(p []byte, addr uint64) error {
	m.reads++
	if addr < m.base || addr-m.base > uint64(len(m.b)) || uint64(len(p)) > uint64(len(m.b))-(addr-m.base) {
		return errUnmapped
	}
	copy(p, m.b[addr-m.base:])
	return nil
}

func mustLookup(t *testing.T, name string) *Request {
	t.Helper()
	r, ok := Lookup(name)
	if !ok {
		t.Fatalf("%s not in the catalogue", name)
	}
	return r
}

func get(t *testing.T, a *Args, name string) []uint64 {
	t.Helper()
	v, ok := a.Get(name)
	if !ok {
		t.Fatalf("no field %q", name)
	}
	return v
}

func TestDecodeMemoryRegion(t *testing.T) {
	b := make([]byte, 32)
	le := binary.LittleEndian
	le.PutUint32(b[0:], 1<<16|3) // SMM address space, slot 3
	le.PutUint32(b[4:], 2)       // KVM_MEM_READONLY
	le.PutUint64(b[8:], 0xfffc0000)
	le.PutUint64(b[16:], 0x40000)
	le.PutUint64(b[24:], 0x7f0000000000)
	m := &bytesAt{base: 0x1000, b: b}
	r := mustLookup(t, "KVM_SET_USER_MEMORY_REGION")
	if r.Cmd != 0x4020ae46 || r.FD != FDVM || !r.Pointer {
		t.Fatalf("request = %+v", r)
	}
	a, err := r.Decode(0x1000, m)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]uint64{"arg": 0x1000, "slot": 3, "as_id": 1, "flags": 2, "guest_phys_addr": 0xfffc0000, "memory_size": 0x40000, "userspace_addr": 0x7f0000000000} {
		if v := get(t, &a, name); len(v) != 1 || v[0] != want {
			t.Errorf("%s = %v, want %#x", name, v, want)
		}
	}
	want := MemoryRegion{Slot: 1<<16 | 3, Flags: 2, GuestPhysAddr: 0xfffc0000, MemorySize: 0x40000, UserspaceAddr: 0x7f0000000000}
	if got := a.MemoryRegion(); got != want {
		t.Errorf("MemoryRegion() = %+v, want %+v", got, want)
	}
	if m.reads != 1 {
		t.Errorf("%d reads of QEMU's memory, want 1", m.reads)
	}
	j, _ := json.Marshal(&a)
	if !strings.Contains(string(j), `"slot":3,"as_id":1,"flags":2,`) || !strings.HasPrefix(string(j), `{"arg":4096,`) {
		t.Errorf("JSON = %s", j)
	}
	if f := r.Fields[2]; f.Names["KVM_MEM_READONLY"] != 2 {
		t.Errorf("flags names = %v", f.Names)
	}
}

func TestDecodeValue(t *testing.T) {
	r := mustLookup(t, "KVM_CREATE_VCPU")
	a, err := r.Decode(2, nil) // a value: memory is never read
	if err != nil {
		t.Fatal(err)
	}
	if v := get(t, &a, "vcpu_id"); v[0] != 2 {
		t.Errorf("vcpu_id = %v", v)
	}
	if j, _ := json.Marshal(&a); string(j) != `{"arg":2,"vcpu_id":2}` {
		t.Errorf("JSON = %s", j)
	}
	if _, ok := a.Get("slot"); ok {
		t.Error("KVM_CREATE_VCPU has a slot field")
	}
}

func msrBuf(n uint32, entries ...uint32) []byte {
	b := make([]byte, 8+16*len(entries))
	binary.LittleEndian.PutUint32(b, n)
	for i, idx := range entries {
		binary.LittleEndian.PutUint32(b[8+16*i:], idx)
		binary.LittleEndian.PutUint64(b[16+16*i:], uint64(i)+100)
	}
	return b
}

func TestDecodeMSRs(t *testing.T) {
	r := mustLookup(t, "KVM_SET_MSRS")
	m := &bytesAt{base: 0x2000, b: msrBuf(2, 0x10, 0xc0000082)}
	a, err := r.Decode(0x2000, m)
	if err != nil {
		t.Fatal(err)
	}
	if v := get(t, &a, "index"); len(v) != 2 || v[0] != 0x10 || v[1] != 0xc0000082 {
		t.Errorf("index = %#x", v)
	}
	if v := get(t, &a, "data"); len(v) != 2 || v[1] != 101 {
		t.Errorf("data = %v", v)
	}
	if j, _ := json.Marshal(&a); string(j) != `{"arg":8192,"nmsrs":2,"index":[16,3221225602],"data":[100,101]}` {
		t.Errorf("JSON = %s", j)
	}
	// More entries claimed than mapped: the read fails, nothing is guessed.
	if _, err := r.Decode(0x2000, &bytesAt{base: 0x2000, b: msrBuf(3, 0x10, 0x11)}); !errors.Is(err, errUnmapped) {
		t.Errorf("short entries: err = %v", err)
	}
	// Above the kernel's limit: refused before any read of the entries.
	m = &bytesAt{base: 0x2000, b: msrBuf(256)}
	if _, err := r.Decode(0x2000, m); err == nil || !strings.Contains(err.Error(), "nmsrs is 256") || m.reads != 1 {
		t.Errorf("nmsrs 256: err = %v after %d reads", err, m.reads)
	}
	// KVM_GET_MSRS has no data field: the values are its output.
	g := mustLookup(t, "KVM_GET_MSRS")
	a, err = g.Decode(0x2000, &bytesAt{base: 0x2000, b: msrBuf(1, 0x10a)})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := a.Get("data"); ok {
		t.Error("KVM_GET_MSRS decodes data")
	}
}

func TestDecodeErrors(t *testing.T) {
	r := mustLookup(t, "KVM_SET_USER_MEMORY_REGION")
	a, err := r.Decode(16, &bytesAt{base: 0x1000, b: make([]byte, 64)})
	if !errors.Is(err, errUnmapped) || !strings.Contains(err.Error(), "KVM_SET_USER_MEMORY_REGION: read 32 bytes at 0x10") {
		t.Errorf("err = %v", err)
	}
	if v, ok := a.Get("arg"); !ok || v[0] != 16 {
		t.Errorf("arg after a failed decode = %v", v)
	}
	if _, ok := a.Get("slot"); ok {
		t.Error("slot after a failed decode")
	}
	if _, err := r.Decode(^uint64(0)-8, &bytesAt{}); err == nil || !strings.Contains(err.Error(), "wraps") {
		t.Errorf("wrapping address: err = %v", err)
	}
	var unknown *Request
	a, err = unknown.Decode(7, nil)
	if v, _ := a.Get("arg"); err != nil || v[0] != 7 {
		t.Errorf("unknown request: %v, %v", v, err)
	}
}

func TestLookup(t *testing.T) {
	for _, s := range []string{"KVM_GET_MSRS", "0xc008ae88", "3221794440", "0xffffffffc008ae88"} {
		if r, ok := Lookup(s); !ok || r.Name != "KVM_GET_MSRS" {
			t.Errorf("Lookup(%q) = %v, %v", s, r, ok)
		}
	}
	if r, ok := Lookup("0x1234"); !ok || r.Name != "0x1234" || r.Cmd != 0x1234 || len(r.Fields) != 0 {
		t.Errorf("an unknown number: %+v, %v", r, ok)
	}
	for _, s := range []string{"KVM_NOPE", "", "-1", "0x100000000", "kvm_run"} {
		if _, ok := Lookup(s); ok {
			t.Errorf("Lookup(%q) found a request", s)
		}
	}
	if Name(0xae80) != "KVM_RUN" || Name(0xdead) != "0xdead" {
		t.Errorf("Name: %q %q", Name(0xae80), Name(0xdead))
	}
	all := All()
	for i := 1; i < len(all); i++ {
		if all[i-1].Name >= all[i].Name {
			t.Fatalf("All() not sorted at %s", all[i].Name)
		}
	}
	// The requests the policy and the tracer name (KVM_* of the survey).
	for _, n := range []string{"KVM_CREATE_DEVICE", "KVM_ENABLE_CAP", "KVM_SET_GUEST_DEBUG", "KVM_SET_USER_MEMORY_REGION2", "KVM_IRQ_LINE_STATUS", "TCGETS", "TUNSETIFF"} {
		mustLookup(t, n)
	}
	if c := mustLookup(t, "KVM_ENABLE_CAP").Fields[0].Names["KVM_CAP_X86_SMM"]; c != 117 {
		t.Errorf("KVM_CAP_X86_SMM = %d, want 117", c)
	}
}

// TestNumbersUpToDate regenerates znumbers.go from the installed headers:
// the catalogue and its numbers must agree.
func TestNumbersUpToDate(t *testing.T) {
	if _, err := os.Stat("/usr/include/linux/kvm.h"); err != nil {
		t.Fatal("the kernel's UAPI headers are missing: apt-get install linux-libc-dev (scripts/setup.sh does)")
	}
	dir := t.TempDir()
	for _, f := range []string{"mknumbers.sh", "catalogue.go"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("bash", filepath.Join(dir, "mknumbers.sh")).CombinedOutput(); err != nil {
		t.Fatalf("mknumbers.sh: %v\n%s", err, out)
	}
	got, _ := os.ReadFile(filepath.Join(dir, "znumbers.go"))
	want, _ := os.ReadFile("znumbers.go")
	if !bytes.Equal(got, want) {
		t.Error("znumbers.go is stale: run go generate ./tracer/ioctl")
	}
}
