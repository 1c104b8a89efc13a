package guestmem

import (
	"bytes"
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testguest"
	"github.com/kvmscope/kvmscope/tracer"
)

// TestGuard runs the tiny guest in guard mode under KVM: the host
// write-protects pattern page 0 (tracer.Protect), the guest stores into
// it three times and once into page 1, and reads page 0 back. The stores
// into page 0 never land and the guest runs on; page 1 changes; each
// blocked store is reported with its address, bytes and vCPU, and
// FindStore names the guest's store instruction and virtual address.
// A host write into the guarded page still works (WriteGuarded). With
// guest RAM from anonymous memory and from a memfd.
func TestGuard(t *testing.T) {
	for _, memfd := range []bool{false, true} {
		name := "anon"
		if memfd {
			name = "memfd"
		}
		t.Run(name, func(t *testing.T) { testGuard(t, memfd, false) })
	}
	// Stores made with the "kernel's text-patching" CR3 loaded land, and
	// are reported as let through (the tiny guest has one CR3: it plays
	// poking_mm's here).
	t.Run("patch", func(t *testing.T) { testGuard(t, false, true) })
}

func testGuard(t *testing.T, memfd, patch bool) {
	const stores = 3
	blocked := make(chan tracer.BlockedWrite, 16)
	g := startLiveGuest(t, guestOptions{memfd: memfd, cmdline: "guard=3 touch=5", opts: tracer.Options{
		Blocked: func(w tracer.BlockedWrite) { blocked <- w },
	}})
	l := g.live
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	page0 := testguest.PatternFor(0)
	var opts tracer.GuardOptions
	if patch {
		opts.PatchCR3 = testguest.PML4GPA
	}
	st, err := g.tr.Protect(ctx, []tracer.GuardRange{{GPA: testguest.PatternGPA, Size: 4096}}, opts)
	if err != nil {
		t.Fatalf("Protect: %v (status %+v)", err, st)
	}
	if len(st.Protected) != 1 || st.Protected[0] != (tracer.GuardRange{GPA: testguest.PatternGPA, Size: 4096}) {
		t.Fatalf("protected %+v, want page %#x", st, testguest.PatternGPA)
	}
	// A host write into the guarded page goes through (and is put back).
	probe := []byte("host-write")
	if _, err := l.WriteAt(probe, testguest.PatternGPA+0x800); err != nil {
		t.Fatalf("host write into the guarded page: %v", err)
	}
	got := make([]byte, len(probe))
	l.ReadAt(got, testguest.PatternGPA+0x800)
	if !bytes.Equal(got, probe) {
		t.Fatalf("host write into the guarded page: read back %q", got)
	}
	if _, err := l.WriteAt(page0[0x800:0x800+len(probe)], testguest.PatternGPA+0x800); err != nil {
		t.Fatal(err)
	}

	// QEMU's own memslot changes on the carved slot: dirty logging on
	// all slots for a second (what migration does first). The guard
	// steps aside for the slot meanwhile and protects it again after.
	if _, err := g.qmp.Execute(ctx, "calc-dirty-rate", map[string]any{"calc-time": 1, "mode": "dirty-bitmap"}); err != nil {
		t.Fatalf("calc-dirty-rate: %v", err)
	}
	sawOff := false
	for {
		if st := g.tr.GuardStatus(); len(st.Protected) == 0 {
			sawOff = true
			if len(st.Unprotected) == 0 {
				t.Fatalf("guard off under dirty logging, with no reason: %+v", st)
			}
		}
		reply, err := g.qmp.Execute(ctx, "query-dirty-rate", nil)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(reply, []byte(`"measured"`)) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !sawOff {
		t.Errorf("the guard stayed on while QEMU logged dirty pages of its slot")
	}
	for st := g.tr.GuardStatus(); len(st.Protected) != 1; st = g.tr.GuardStatus() {
		if ctx.Err() != nil {
			t.Fatalf("after dirty logging ended: %+v, want the page protected again", st)
		}
		time.Sleep(10 * time.Millisecond)
	}

	writeU64(t, l, testguest.GoGPA, 1)
	deadline := time.Now().Add(20 * time.Second)
	for readU64(t, l, testguest.GuardDoneGPA) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the guest did not finish its stores: a blocked store stopped it")
		}
		time.Sleep(5 * time.Millisecond)
	}
	page := make([]byte, 4096)
	if _, err := l.ReadAt(page, testguest.PatternGPA); err != nil {
		t.Fatal(err)
	}
	if patch {
		if v := readU64(t, l, testguest.GuardTargetGPA); v != testguest.GuardValue || readU64(t, l, testguest.GuardSeenGPA) != testguest.GuardValue {
			t.Errorf("a store with the patching CR3 did not land: %#x", v)
		}
	} else if !bytes.Equal(page, page0) {
		t.Errorf("the guarded page changed: %q", page[0x100:0x108])
	}
	if v := readU64(t, l, testguest.GuardSeenGPA); !patch && v == testguest.GuardValue {
		t.Errorf("the guest read its own blocked store back")
	}
	if v := readU64(t, l, testguest.GuardNeighbourGPA); v != testguest.GuardValue {
		t.Errorf("neighbouring page holds %#x, want the guest's store %#x", v, uint64(testguest.GuardValue))
	}
	c0 := readU64(t, l, testguest.CounterGPA)
	for readU64(t, l, testguest.CounterGPA) == c0 {
		if time.Now().After(deadline) {
			t.Fatal("the guest does not run on after the blocked stores")
		}
		time.Sleep(5 * time.Millisecond)
	}

	storeRIP, err := testguest.Symbol(mustKernel(t), "guard_store")
	if err != nil {
		t.Fatal(err)
	}
	want := binary.LittleEndian.AppendUint64(nil, testguest.GuardValue)
	for i := 0; i < stores; i++ {
		var w tracer.BlockedWrite
		select {
		case w = <-blocked:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d blocked writes reported, want %d", i, stores)
		}
		if w.GPA != testguest.GuardTargetGPA || !bytes.Equal(w.Data, want) || w.VCPU != 0 || w.Regs == nil || w.Landed != patch {
			t.Fatalf("blocked write %d: %+v, want gpa %#x data %x vcpu 0", i, w, testguest.GuardTargetGPA, want)
		}
		s, err := FindStore(l, *w.Regs, w.GPA, w.Data)
		if err != nil {
			t.Fatalf("FindStore: %v", err)
		}
		if s.RIP != storeRIP || s.GVA != testguest.GuardTargetVA {
			t.Errorf("store at rip %#x gva %#x (%s), want rip %#x gva %#x", s.RIP, s.GVA, s.Insn, storeRIP, uint64(testguest.GuardTargetVA))
		}
	}
	select {
	case w := <-blocked:
		t.Errorf("an extra blocked write: %+v", w)
	default:
	}
	if st := g.tr.GuardStatus(); (patch && st.Allowed != stores) || (!patch && st.Blocked != stores) {
		t.Errorf("status counts %d blocked and %d allowed writes, want %d", st.Blocked, st.Allowed, stores)
	}
	// Unprotecting puts QEMU's memslot back whole.
	if st, err := g.tr.Protect(ctx, nil, tracer.GuardOptions{}); err != nil || len(st.Protected) != 0 {
		t.Fatalf("unprotect: %+v, %v", st, err)
	}
}

func mustKernel(t *testing.T) string {
	k, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func writeU64(t *testing.T, l *Live, gpa uint64, v uint64) {
	t.Helper()
	if _, err := l.WriteAt(binary.LittleEndian.AppendUint64(nil, v), int64(gpa)); err != nil {
		t.Fatal(err)
	}
}
