package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testguest"
	"github.com/kvmscope/kvmscope/session"
)

// TestRegisterWriteMSR: MSR writes (KVM_SET_MSRS run as QEMU on the vCPU's
// thread, the tiny guest under KVM in regs mode) reach the vCPU: the
// guest's own rdmsr of MSR_KERNEL_GS_BASE, which no guest code writes,
// reads the value the host wrote. The reply and the register_write event
// say KVM_SET_MSRS, with the old and new values, and the read back holds.
// A write KVM refuses part-way (star fine, lstar not canonical) or keeps
// otherwise than written (sysenter_eip on AMD) fails whole in one line:
// the next write finds star and sysenter_esp as they were. While QEMU
// holds a copy of the MSRs that it will write back (stopped after a state
// sync), a write is refused; after cont it lands. An MSR kvmscope does not
// write (efer) and a request that mixes general registers and MSRs are
// refused in one line.
func TestRegisterWriteMSR(t *testing.T) {
	qmpPath := filepath.Join(t.TempDir(), "qmp.sock")
	r := startRun(t, []string{"--allow-write"}, append(tinyGuest(t, 1, "regs"), "-qmp", "unix:"+qmpPath+",server=on,wait=off")...)
	c := r.client()
	waitReady(t, c)
	regs := func(args ...string) (session.RegisterWrite, string, int) {
		t.Helper()
		out, errOut, code := kvmscope(t, append([]string{"regs", "set", "--api", r.sock, "--vcpu", "0", "--json"}, args...)...)
		var w session.RegisterWrite
		if code == 0 {
			if err := json.Unmarshal([]byte(out), &w); err != nil {
				t.Fatalf("regs set %v --json: %v\n%s", args, err, out)
			}
		}
		return w, errOut, code
	}

	const gsBase = 0xffff888012345000
	w, errOut, code := regs(fmt.Sprintf("kernel_gs_base=%#x", uint64(gsBase)))
	if code != 0 {
		t.Fatalf("regs set kernel_gs_base: code %d: %s", code, errOut)
	}
	want := fmt.Sprintf("%#x", uint64(gsBase))
	if w.Via != "KVM_SET_MSRS" || w.Old["kernel_gs_base"] != "0x0" || w.New["kernel_gs_base"] != want {
		t.Errorf("reply %+v; want via KVM_SET_MSRS, kernel_gs_base 0x0 -> %s", w, want)
	}
	if b := w.Readback; b == nil || !b.Fresh || !slices.Equal(b.Held, []string{"kernel_gs_base"}) {
		t.Errorf("read back %+v; want fresh, kernel_gs_base as written", b)
	}
	waitFor(t, 30*time.Second, "the guest's rdmsr to read the value written", func() bool {
		return readU64(t, c, testguest.MSRSeenGPA) == gsBase
	})
	var ev map[string]any
	for _, e := range events(t, r.sock) {
		if e["kind"] == "register_write" {
			ev = e
		}
	}
	nw, _ := ev["new"].(map[string]any)
	if ev == nil || ev["via"] != "KVM_SET_MSRS" || nw["kernel_gs_base"] != want {
		t.Errorf("register_write event %v", ev)
	}

	// KVM sets star, then refuses lstar: star is put back.
	_, errOut, code = regs("star=0x23001000000000", "lstar=0x8000000000000000")
	refused(t, "non-canonical lstar", errOut, code, "KVM refused lstar = 0x8000000000000000")
	// AMD keeps 32 bits of SYSENTER_EIP (Intel refuses the value): either
	// way the write fails whole.
	_, errOut, code = regs("sysenter_esp=0x1000", "sysenter_eip=0x8000000000000000")
	if !strings.Contains(errOut, "KVM refused sysenter_eip") {
		refused(t, "non-canonical sysenter_eip", errOut, code, "sysenter_eip reads back as 0x0, not 0x8000000000000000; the old values were put back")
	}
	for _, msr := range []string{"star", "sysenter_esp"} {
		w, errOut, code = regs(msr + "=0x2000")
		if code != 0 || w.Old[msr] != "0x0" {
			t.Errorf("%s after the refused write: code %d %s, old %q; want 0x0 (the refused write changed nothing)", msr, code, errOut, w.Old[msr])
		}
	}
	// QEMU stopped, then synced (HMP info registers: KVM_GET_MSRS) holds
	// a copy of the MSRs it writes back at cont: a write now would be
	// undone, and is refused until QEMU has put its copy back.
	ctx, q := dialQMP(t, qmpPath)
	if _, err := q.Execute(ctx, "stop", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := q.HMP(ctx, "info registers"); err != nil {
		t.Fatal(err)
	}
	_, errOut, code = regs("kernel_gs_base=0x1000")
	refused(t, "kernel_gs_base while QEMU holds a copy", errOut, code, "QEMU holds a copy of kernel_gs_base")
	if _, err := q.Execute(ctx, "cont", nil); err != nil {
		t.Fatal(err)
	}
	w, errOut, code = regs("kernel_gs_base=0x1000")
	if code != 0 || w.Old["kernel_gs_base"] != want || w.Pauses < 1 {
		t.Errorf("kernel_gs_base after cont: code %d %s, %+v; want the write to land, old %s", code, errOut, w, want)
	}
	waitFor(t, 30*time.Second, "the guest's rdmsr to read the second value", func() bool {
		return readU64(t, c, testguest.MSRSeenGPA) == 0x1000
	})

	_, errOut, code = regs("efer=0")
	refused(t, "efer", errOut, code, `register "efer" cannot be written`)
	_, errOut, code = regs("rax=1", "lstar=0xffffffff81000000")
	refused(t, "rax with lstar", errOut, code, "separate requests")
}
