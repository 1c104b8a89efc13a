package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/kvmscope/kvmscope/internal/testlinux"
	"github.com/kvmscope/kvmscope/introspect"
	"github.com/kvmscope/kvmscope/session"
)

// TestIntegrity: on a live Debian guest (TCG) a clean kernel prints [];
// the first scan takes the baseline next to the socket and the next
// compares against it; a host-side write of sys_call_table[62] (kill) is
// named with its baseline, and --restore puts it back (verified by the
// next check); a dump of the clean guest judges clean.
func TestIntegrity(t *testing.T) {
	p := testlinux.Require(t)
	sock := filepath.Join(t.TempDir(), "api.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	g, err := testlinux.Boot(ctx, testlinux.Options{
		Kernel:  p.DebianKernel,
		Accel:   "tcg",
		Wrapper: []string{kvmscopeBin, "--log-level", "warn", "run", "--allow-write", "--api", sock, "--"},
	})
	if err != nil {
		t.Fatalf("boot under kvmscope run: %v", err)
	}
	defer g.Close()

	check := func(what string, args ...string) []introspect.Deviation { return integrityJSON(t, what, args...) }
	if devs := check("first scan", "--api", sock); len(devs) != 0 {
		t.Fatalf("clean kernel: %+v", devs)
	}
	base := readBaseline(t, sock)
	out, _, code := kvmscope(t, "integrity", "--api", sock)
	if code != 0 || !strings.Contains(out, "no deviations (baseline: compared)") {
		t.Errorf("second scan: %q", out)
	}

	tamperAndRestore(t, sock, base)

	core := filepath.Join(t.TempDir(), "vm.core")
	if _, errOut, code := kvmscope(t, "dump", "--api", sock, "-o", core); code != 0 {
		t.Fatalf("dump: %s", errOut)
	}
	if devs := check("dump", "--core", core); len(devs) != 0 {
		t.Errorf("dump of a clean kernel: %+v", devs)
	}
}

// integrityJSON runs kvmscope integrity --json ARGS and returns the
// deviations.
func integrityJSON(t *testing.T, what string, args ...string) []introspect.Deviation {
	t.Helper()
	out, errOut, code := kvmscope(t, append([]string{"integrity", "--json"}, args...)...)
	if code != 0 {
		t.Fatalf("%s: integrity: code %d: %s", what, code, errOut)
	}
	var devs []introspect.Deviation
	if err := json.Unmarshal([]byte(out), &devs); err != nil {
		t.Fatalf("%s: %v: %q", what, err, out)
	}
	return devs
}

// readBaseline reads the dispatch baseline kept next to the socket.
func readBaseline(t *testing.T, sock string) introspect.Dispatch {
	t.Helper()
	b, err := os.ReadFile(launch.BaselinePath(sock))
	if err != nil {
		t.Fatalf("no baseline next to the socket: %v", err)
	}
	var base struct{ Dispatch introspect.Dispatch }
	if err := json.Unmarshal(b, &base); err != nil || len(base.Dispatch.Tables) == 0 || base.Dispatch.Tables[0].Name != "sys_call_table" {
		t.Fatalf("baseline: %v %+v", err, base.Dispatch.Tables)
	}
	return base.Dispatch
}

// tamperAndRestore points sys_call_table[62] one byte into
// __x64_sys_kill from the host (PUT /v1/memory; the VM runs with
// --allow-write), checks that integrity names it with its baseline, and
// that --restore puts it back.
func tamperAndRestore(t *testing.T, sock string, base introspect.Dispatch) {
	t.Helper()
	var k api.Kernel
	out, _, _ := kvmscope(t, "kernel", "--api", sock, "--json")
	if err := json.Unmarshal([]byte(out), &k); err != nil {
		t.Fatal(err)
	}
	tbl := base.Tables[0]
	va := tbl.Addr + 62*8
	pa := va - uint64(k.TextVA) + uint64(k.PhysBase)
	orig := tbl.Entries[62]
	put := func(v uint64) {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], v)
		if err := api.NewClient(sock).Put(ctxT(t), fmt.Sprintf("/v1/memory?gpa=%#x", pa), w[:]); err != nil {
			t.Fatalf("write sys_call_table[62]: %v", err)
		}
	}
	put(orig + 1)
	devs := integrityJSON(t, "tampered", "--api", sock)
	out, errOut, code := kvmscope(t, "integrity", "--api", sock, "--restore")
	if code != 0 || !strings.Contains(out, "restored sys_call_table[62]") {
		t.Errorf("--restore: code %d: %s%s", code, out, errOut)
	}
	found := false
	for _, d := range devs {
		if d.What == "sys_call_table[62]" {
			found = true
			if d.Current != fmt.Sprintf("%#x", orig+1) || !strings.HasPrefix(d.BaselineSymbol, "__x64_sys_kill") {
				t.Errorf("deviation %+v", d)
			}
		}
	}
	if !found {
		t.Errorf("the changed entry was not reported: %+v", devs)
	}
	if devs := integrityJSON(t, "restored", "--api", sock); len(devs) != 0 {
		t.Errorf("after the restore: %+v", devs)
	}

}

// hookAndRestoreLSTAR hooks the syscall entry MSR of every vCPU from the
// host, as a rootkit would (LSTAR 0x10 bytes into entry_SYSCALL_64), with
// the VM stopped by its monitor so that no system call enters through the
// hook; checks that integrity names each vCPU's LSTAR with its symbol,
// that --restore puts them back (through KVM_SET_MSRS) and the next check
// is clean, and that the guest runs on after cont: its first system call
// would crash it otherwise.
func hookAndRestoreLSTAR(t *testing.T, sock string, g *testlinux.Guest) {
	t.Helper()
	if _, err := g.QMP("stop", nil); err != nil {
		t.Fatal(err)
	}
	setLSTAR := func(vcpu int, v uint64) (old uint64) {
		out, errOut, code := kvmscope(t, "regs", "set", "--api", sock, "--json", "--vcpu", fmt.Sprint(vcpu), fmt.Sprintf("lstar=%#x", v))
		var w session.RegisterWrite
		if code != 0 || json.Unmarshal([]byte(out), &w) != nil {
			t.Fatalf("set vCPU %d's LSTAR: code %d: %s%s", vcpu, code, out, errOut)
		}
		old, _ = strconv.ParseUint(w.Old["lstar"], 0, 64)
		return old
	}
	// The first write says where LSTAR was: entry_SYSCALL_64, which the
	// clean check before this one verified.
	vm := getVM(t, api.NewClient(sock))
	var entry uint64
	for _, v := range vm.VCPUs {
		entry = setLSTAR(v.ID, 0xffffffff81000000)
		setLSTAR(v.ID, entry+0x10)
	}
	hooked := 0
	for _, d := range integrityJSON(t, "LSTAR hooked", "--api", sock) {
		if strings.HasSuffix(d.What, ".lstar") && d.Current == fmt.Sprintf("%#x", entry+0x10) && d.CurrentSymbol == "entry_SYSCALL_64+0x10" {
			hooked++
		}
	}
	if hooked != len(vm.VCPUs) {
		t.Errorf("integrity named %d hooked LSTARs, want %d", hooked, len(vm.VCPUs))
	}
	out, errOut, code := kvmscope(t, "integrity", "--api", sock, "--restore")
	if code != 0 || strings.Count(out, ".lstar") != len(vm.VCPUs) {
		t.Errorf("--restore of LSTAR: code %d: %s%s", code, out, errOut)
	}
	if devs := integrityJSON(t, "LSTAR restored", "--api", sock); len(devs) != 0 {
		t.Errorf("after restoring LSTAR: %+v", devs)
	}
	if _, err := g.QMP("cont", nil); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	if st, err := g.HMP("info status"); err != nil || !strings.Contains(st, "running") {
		t.Errorf("after cont: %q, %v; want the guest running", st, err)
	}
	if procs := psJSON(t, "--api", sock); len(procs) == 0 {
		t.Error("no processes after the LSTAR restore")
	}
}
