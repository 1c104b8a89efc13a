package main

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testguest"
	"github.com/kvmscope/kvmscope/session"
)

// TestRegisterWrite: host writes of vCPU registers (run --allow-write,
// the tiny guest under KVM in regs mode) change what the guest does.
// r15=RegsMagic with r14=V makes the guest publish V, which it can get
// only from the host (no guest code touches r14 or r15 in that mode); the
// write is a register_write event with the old and new values. Then
// rip=regs_exit with rax=5 makes the guest exit QEMU with status 11.
// Without --allow-write, and for a register outside rax..r15, rip and
// rflags, the CLI refuses in one line.
func TestRegisterWrite(t *testing.T) {
	guest := tinyGuest(t, 1, "regs")
	elf, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	exit, err := testguest.Symbol(elf, "regs_exit")
	if err != nil {
		t.Fatal(err)
	}
	regs := func(sock string, args ...string) (string, string, int) {
		t.Helper()
		return kvmscope(t, append([]string{"regs", "set", "--api", sock}, args...)...)
	}

	t.Run("read-only", func(t *testing.T) {
		r := startRun(t, nil, guest...)
		waitReady(t, r.client())
		_, errOut, code := regs(r.sock, "--vcpu", "0", fmt.Sprintf("r15=%#x", testguest.RegsMagic))
		refused(t, "without --allow-write", errOut, code, "--allow-write")
	})

	r := startRun(t, []string{"--allow-write"}, guest...)
	c := r.client()
	waitReady(t, c)
	_, errOut, code := regs(r.sock, "--vcpu", "0", "cr3=0x1000")
	refused(t, "cr3", errOut, code, `register "cr3" cannot be written`)
	_, errOut, code = regs(r.sock, "--vcpu", "7", "r15=1")
	refused(t, "vCPU 7", errOut, code, "no such vCPU")
	_, errOut, code = regs(r.sock, "--vcpu", "0", "rflags=0x80000002")
	refused(t, "reserved rflags", errOut, code, "reserved bits")
	if done := readU64(t, c, testguest.RegsDoneGPA); done != 0 {
		t.Fatalf("regs_done %d before any write", done)
	}

	const seen = 0x1234abcd
	out, errOut, code := regs(r.sock, "--vcpu", "0", "--json", fmt.Sprintf("r15=%#x", uint64(testguest.RegsMagic)), fmt.Sprintf("r14=%#x", seen))
	if code != 0 {
		t.Fatalf("regs set r15 r14: code %d: %s", code, errOut)
	}
	var w session.RegisterWrite
	if err := json.Unmarshal([]byte(out), &w); err != nil {
		t.Fatalf("regs set --json: %v\n%s", err, out)
	}
	magic := fmt.Sprintf("%#x", uint64(testguest.RegsMagic))
	if w.VCPU != 0 || w.Old["r15"] != "0x0" || w.New["r15"] != magic || w.New["r14"] != fmt.Sprintf("%#x", seen) {
		t.Errorf("reply %+v", w)
	}
	switch b := w.Readback; {
	case b == nil || b.Error != "":
		t.Errorf("no read back: %+v", b)
	case b.Fresh && !slices.Equal(b.Held, []string{"r14", "r15"}):
		t.Errorf("read back %+v; want r14 and r15 as written (the guest does not change them)", b)
	case !b.Fresh:
		t.Logf("read back not fresh (the vCPU did not answer a kick): %+v", b)
	}
	waitFor(t, 30*time.Second, "the guest to see r15", func() bool { return readU64(t, c, testguest.RegsDoneGPA) == 1 })
	if got := readU64(t, c, testguest.RegsSeenGPA); got != seen {
		t.Errorf("the guest saw r14 = %#x, want %#x", got, seen)
	}
	var ev map[string]any
	for _, e := range events(t, r.sock) {
		if e["kind"] == "register_write" {
			ev = e
		}
	}
	old, _ := ev["old"].(map[string]any)
	nw, _ := ev["new"].(map[string]any)
	if ev == nil || ev["vcpu"] != 0.0 || old["r15"] != "0x0" || nw["r15"] != magic || nw["r14"] != fmt.Sprintf("%#x", seen) {
		t.Errorf("register_write event %v", ev)
	}

	// Send the guest to regs_exit with rax=5: QEMU exits with 5<<1|1.
	// QEMU may be gone before the reply is sent.
	out, errOut, code = regs(r.sock, "--vcpu", "0", fmt.Sprintf("rip=%#x", exit), "rax=5")
	t.Logf("regs set rip rax: code %d: %s%s", code, out, errOut)
	if st := r.wait(30 * time.Second); st != testguest.ExitStatus(5) {
		t.Errorf("kvmscope run exited with %d, want %d (the guest at regs_exit with rax=5)", st, testguest.ExitStatus(5))
	}
}

// TestRegisterWriteBusy: writes to a guest that makes port-I/O exits
// (io=N) all land, though a pause often finds its vCPU in an exit QEMU
// has not completed (guestmem.TestLiveSetRegistersBusy): the session
// resumes the VM and tries again.
func TestRegisterWriteBusy(t *testing.T) {
	r := startRun(t, []string{"--allow-write"}, tinyGuest(t, 1, "io=1000000000")...)
	waitReady(t, r.client())
	// Every write lands. Finding the vCPU in an I/O exit is a race, so
	// after 10 writes go on until one was retried, at most 300 in all.
	writes, pauses := 0, 0
	for ; writes < 10 || pauses == writes && writes < 300; writes++ {
		out, errOut, code := kvmscope(t, "regs", "set", "--api", r.sock, "--vcpu", "0", "--json", fmt.Sprintf("r15=%d", writes))
		if code != 0 {
			t.Fatalf("write %d: code %d: %s", writes, code, errOut)
		}
		var w session.RegisterWrite
		if err := json.Unmarshal([]byte(out), &w); err != nil {
			t.Fatal(err)
		}
		pauses += w.Pauses
	}
	t.Logf("%d writes took %d pauses", writes, pauses)
	if pauses == writes {
		t.Errorf("no write of %d was retried: the vCPU of an io=N guest was never found in an I/O exit", writes)
	}
}

// refused checks that a command failed with one line of stderr that
// contains want.
func refused(t *testing.T, what, errOut string, code int, want string) {
	t.Helper()
	if code == 0 || strings.Count(strings.TrimSpace(errOut), "\n") != 0 || !strings.Contains(errOut, want) {
		t.Errorf("%s: code %d, stderr %q; want one line containing %q", what, code, errOut, want)
	}
}
