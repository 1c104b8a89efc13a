//go:build linux && amd64

package guestmem

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testguest"
	"github.com/kvmscope/kvmscope/tracer"
)

// TestLiveSetRegisters runs the tiny guest in regs mode under KVM and
// writes its r15 and r14 through kvm_run with QEMU paused: the guest,
// which waits for r15 to hold RegsMagic, publishes the r14 written, and a
// fresh read shows both. A write while QEMU runs, a write of cr3 and one
// through a read-only source are refused before anything is written.
func TestLiveSetRegisters(t *testing.T) {
	g := startLiveGuest(t, guestOptions{cmdline: "regs"})
	l := g.live
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	set := map[string]uint64{"r15": testguest.RegsMagic, "r14": 0xfeed}

	if _, _, err := l.SetRegisters(ctx, 0, set); err == nil || !strings.Contains(err.Error(), "not stopped") {
		t.Errorf("write with QEMU running: %v; want it refused", err)
	}
	if _, _, err := l.SetRegisters(ctx, 0, map[string]uint64{"cr3": 0x1000}); err == nil || !strings.Contains(err.Error(), `"cr3"`) {
		t.Errorf("write of cr3: %v; want it refused", err)
	}
	if _, _, err := NewLive(g.tr.VM(), false).SetRegisters(ctx, 0, set); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write through a read-only source: %v; want ErrReadOnly", err)
	}
	if v := readU64(t, l, testguest.RegsDoneGPA); v != 0 {
		t.Fatalf("regs_done %d before the write", v)
	}

	resume, err := g.tr.Pause(ctx)
	if err != nil {
		t.Fatal(err)
	}
	old, new, err := l.SetRegisters(ctx, 0, set)
	resume()
	if err != nil {
		t.Fatal(err)
	}
	if old["r15"] != 0 || old["r14"] != 0 || new["r15"] != testguest.RegsMagic || new["r14"] != 0xfeed {
		t.Errorf("old %x new %x", old, new)
	}
	deadline := time.Now().Add(20 * time.Second)
	for readU64(t, l, testguest.RegsDoneGPA) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the guest did not see r15: KVM did not load the write")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if v := readU64(t, l, testguest.RegsSeenGPA); v != 0xfeed {
		t.Errorf("the guest saw r14 = %#x, want 0xfeed", v)
	}
	regs, fresh, err := l.GeneralRegisters(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !fresh || regs["r15"] != testguest.RegsMagic || regs["r14"] != 0xfeed {
		t.Errorf("read back (fresh %v): r15 %#x r14 %#x", fresh, regs["r15"], regs["r14"])
	}
}

// TestLiveSetRegistersBusy pauses a guest that makes port-I/O exits
// (io=N) many times and writes a register it does not use: a pause that
// finds the vCPU in an exit QEMU has not completed is refused with
// tracer.ErrVCPUBusy (KVM would complete it over the write), the others
// succeed, and the guest's I/O loop runs on.
func TestLiveSetRegistersBusy(t *testing.T) {
	g := startLiveGuest(t, guestOptions{cmdline: "io=1000000000"})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var busy, ok int
	for i := 0; i < 300 && (busy == 0 || ok == 0); i++ {
		resume, err := g.tr.Pause(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_, _, err = g.live.SetRegisters(ctx, 0, map[string]uint64{"r15": uint64(i)})
		resume()
		switch {
		case errors.Is(err, tracer.ErrVCPUBusy):
			busy++
		case err == nil:
			ok++
		default:
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	t.Logf("%d writes, %d refused as busy", ok, busy)
	if busy == 0 || ok == 0 {
		t.Errorf("%d writes, %d busy: want both (the vCPU of an io=N guest is often in QEMU for an exit)", ok, busy)
	}
}
