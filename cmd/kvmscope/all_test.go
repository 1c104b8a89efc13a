package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// allPS is one VM of ps --all --json.
type allPS struct {
	VM        string        `json:"vm"`
	Socket    string        `json:"socket"`
	Processes []api.Process `json:"processes"`
	Error     string        `json:"error"`
}

// TestPsAll: a directory with Debian (TCG, `kvmscope run --api
// DIR/debian.sock`) and a tiny guest (KVM, no Linux kernel) and a stale
// socket: ps --all --json has Debian's processes, as the guest itself
// lists them, and the tiny guest's error; exit status 0. The table has
// the VM column first; lsmod --all, report --all and list see the same; with only the
// tiny guest left, every VM failed and the exit status is 1.
func TestPsAll(t *testing.T) {
	p := testlinux.Require(t)
	tiny := tinyGuest(t, 1, "")
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	g, err := testlinux.Boot(ctx, testlinux.Options{
		Kernel:  p.DebianKernel,
		Accel:   "tcg",
		Wrapper: []string{kvmscopeBin, "--log-level", "warn", "run", "--api", filepath.Join(dir, "debian.sock"), "--"},
	})
	if err != nil {
		t.Fatalf("boot under kvmscope run: %v", err)
	}
	defer g.Close()
	waitReady(t, startVM(t, dir, "tiny", tiny...).client())
	staleSocket(t, filepath.Join(dir, "gone.sock"))

	out, errOut, code := kvmscope(t, "ps", "--all", "--json", "--dir", dir, "--jobs", "2")
	if code != 0 {
		t.Fatalf("ps --all --json: code %d: %s", code, errOut)
	}
	var res []allPS
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("ps --all --json: %v: %s", err, out)
	}
	if len(res) != 2 || res[0].VM != "debian" || res[1].VM != "tiny" {
		t.Fatalf("ps --all --json: %d entries %+v; want debian and tiny", len(res), res)
	}
	deb, tin := res[0], res[1]
	if deb.Error != "" || deb.Socket != filepath.Join(dir, "debian.sock") {
		t.Fatalf("debian: error %q, socket %s", deb.Error, deb.Socket)
	}
	checkPS(t, "ps --all debian", deb.Processes, g.PS())
	if tin.Error == "" || tin.Processes != nil {
		t.Errorf("tiny: %d processes, error %q; want an error (no Linux kernel)", len(tin.Processes), tin.Error)
	}
	if !strings.Contains(errOut, "VM tiny: ") || !strings.Contains(errOut, "VM gone: stale") {
		t.Errorf("stderr %q; want tiny's error and a note on the stale socket", errOut)
	}
	t.Logf("debian: %d processes; tiny: %s", len(deb.Processes), tin.Error)

	out, errOut, code = kvmscope(t, "ps", "--all", "--dir", dir)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) < 2 || !strings.HasPrefix(lines[0], "VM ") {
		t.Fatalf("ps --all: code %d\n%s%s", code, out, errOut)
	}
	init := false
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		if len(f) < 8 || f[0] != "debian" {
			t.Errorf("ps --all row %q: want the VM debian first", l)
			continue
		}
		init = init || (f[1] == "1" && f[2] == "0")
	}
	if !init {
		t.Errorf("ps --all: no pid 1 in debian's rows:\n%s", out)
	}

	out, errOut, code = kvmscope(t, "lsmod", "--all", "--json", "--dir", dir)
	var mods []struct {
		VM      string        `json:"vm"`
		Modules *[]api.Module `json:"modules"`
		Error   string        `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &mods); code != 0 || err != nil || len(mods) != 2 ||
		mods[0].Modules == nil || mods[0].Error != "" || mods[1].Error == "" {
		t.Errorf("lsmod --all --json: code %d, %v: %s%s", code, err, out, errOut)
	}

	out, errOut, code = kvmscope(t, "report", "--all", "--json", "--dir", dir)
	var reps []struct {
		VM     string `json:"vm"`
		Report *struct {
			Judged []string `json:"judged"`
		} `json:"report"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &reps); code != 0 || err != nil || len(reps) != 2 ||
		reps[0].Report == nil || len(reps[0].Report.Judged) == 0 || reps[1].Error == "" {
		t.Errorf("report --all --json: code %d, %v: %s%s", code, err, out, errOut)
	}

	// The kernel is discovered now: list names Debian's release.
	vms := listJSON(t, "--dir", dir)
	if k := vms["debian"].Kernel; k != g.Release() || vms["debian"].Accel != "tcg" || vms["debian"].VCPUs != 2 {
		t.Errorf("list: debian %+v; want kernel %q, tcg, 2 vCPUs", vms["debian"], g.Release())
	}

	// Every (live) VM failing is a failure.
	g.Close()
	waitFor(t, 20*time.Second, "debian's socket to go", func() bool {
		socks, _ := api.ScanSockets(dir)
		for _, s := range socks {
			if s.Name == "debian" {
				return false
			}
		}
		return true
	})
	out, errOut, code = kvmscope(t, "ps", "--all", "--json", "--dir", dir)
	if err := json.Unmarshal([]byte(out), &res); code != 1 || err != nil || len(res) != 1 || res[0].Error == "" ||
		!strings.Contains(errOut, "every VM failed") {
		t.Errorf("ps --all with the tiny guest only: code %d, %v: %s%s", code, err, out, errOut)
	}
}

// TestFanOut: results come back in the sockets' order, and no more than
// jobs run at once.
func TestFanOut(t *testing.T) {
	var socks []api.FleetSocket
	for i := range 20 {
		socks = append(socks, api.FleetSocket{Name: fmt.Sprint(i)})
	}
	var mu sync.Mutex
	running, most := 0, 0
	got := fanOut(socks, 3, func(s api.FleetSocket) string {
		mu.Lock()
		running++
		most = max(most, running)
		mu.Unlock()
		time.Sleep(5 * time.Millisecond)
		mu.Lock()
		running--
		mu.Unlock()
		return "vm" + s.Name
	})
	for i, g := range got {
		if g != fmt.Sprintf("vm%d", i) {
			t.Fatalf("result %d = %q", i, g)
		}
	}
	if most != 3 {
		t.Errorf("at most %d ran at once; want 3 (--jobs)", most)
	}
}

// TestScanSockets: only sockets named NAME.sock count; a name in an
// earlier directory hides a later one; a missing directory holds none.
func TestScanSockets(t *testing.T) {
	d1, d2 := t.TempDir(), t.TempDir()
	for _, p := range []string{d1 + "/b.sock", d1 + "/a.sock", d2 + "/a.sock", d2 + "/c.sock", d2 + "/c.other"} {
		staleSocket(t, p)
	}
	os.WriteFile(d1+"/file.sock", nil, 0o600)
	os.WriteFile(d1+"/a.events.jsonl", nil, 0o600)
	socks, errs := api.ScanSockets(d1, d2, filepath.Join(d1, "missing"))
	want := []api.FleetSocket{{Name: "a", Path: d1 + "/a.sock"}, {Name: "b", Path: d1 + "/b.sock"}, {Name: "c", Path: d2 + "/c.sock"}}
	if len(errs) != 0 || fmt.Sprint(socks) != fmt.Sprint(want) {
		t.Errorf("ScanSockets = %v, %v; want %v", socks, errs, want)
	}
	if err := api.ProbeSocket(d1+"/a.sock", time.Second); !errors.Is(err, api.ErrStale) {
		t.Errorf("ProbeSocket of a stale socket: %v", err)
	}
}

func TestProcessAgeAndRelease(t *testing.T) {
	age, err := processAge(os.Getpid())
	if err != nil || age < 0 || age > time.Hour {
		t.Errorf("processAge(self) = %v, %v", age, err)
	}
	if _, err := processAge(-1); err == nil {
		t.Error("processAge(-1): no error")
	}
	k := api.Kernel{Banner: "Linux version 6.1.0-31-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12) #1 SMP", Version: "6.1.128"}
	if r := kernelRelease(k); r != "6.1.0-31-cloud-amd64" {
		t.Errorf("kernelRelease = %q", r)
	}
	if r := kernelRelease(api.Kernel{Version: "5.10.0"}); r != "5.10.0" {
		t.Errorf("kernelRelease without a banner = %q", r)
	}
}
