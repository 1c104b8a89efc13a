package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/kvmscope/kvmscope/internal/testlinux"
	"github.com/kvmscope/kvmscope/introspect"
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
