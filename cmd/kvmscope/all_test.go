package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
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
